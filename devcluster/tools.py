"""The kubectl and helm the dev cluster builds, and applying manifests with them."""
from __future__ import annotations

import os
import subprocess
import time
from typing import Iterable

from muxtune.devcluster import build as _build


def _run_tool(name: str, args, kubeconfig, input: str | None, check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a binary built by :mod:`muxtune.devcluster.build` (text mode, output captured);
    raises KubectlError, whose message carries stderr, when ``check`` and it fails."""
    exe = _build.bin_path(name)
    if not exe.exists():
        _build.ensure_binaries([name])
    cmd = [str(exe)]
    if kubeconfig is not None:
        cmd.append(f"--kubeconfig={kubeconfig}")
    cmd += list(args)
    # no input: stdin is /dev/null, so a tool never waits on the caller's terminal
    p = subprocess.run(cmd, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise KubectlError(p.returncode, cmd, p.stdout, p.stderr)
    return p


def kubectl(
    *args: str,
    kubeconfig: str | os.PathLike[str] | None = None,
    input: str | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run the kubectl built by :mod:`muxtune.devcluster.build`."""
    return _run_tool("kubectl", args, kubeconfig, input, check, timeout)


def helm(
    *args: str,
    kubeconfig: str | os.PathLike[str] | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run the helm (v3) built by :mod:`muxtune.devcluster.build`; same contract as :func:`kubectl`."""
    return _run_tool("helm", args, kubeconfig, None, check, timeout)


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl (or helm) call; ``str()`` includes the tool's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


def apply_manifests(
    manifests: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    kubeconfig: str | os.PathLike[str],
    server_side: bool = True,
) -> str:
    """``kubectl apply`` YAML text, or file/dir path(s). Returns kubectl's stdout."""
    if isinstance(manifests, str) and ("\n" in manifests or manifests.lstrip().startswith(("apiVersion", "{", "---"))):
        args = ["apply", "-f", "-"]
        stdin = manifests
    else:
        paths = [manifests] if isinstance(manifests, (str, os.PathLike)) else list(manifests)
        args = ["apply"] + [a for p in paths for a in ("-f", str(p))]
        stdin = None
    if server_side:
        args += ["--server-side", "--force-conflicts", "--field-manager=muxtune-devcluster"]
    return kubectl(*args, kubeconfig=kubeconfig, input=stdin).stdout


def apply_crds(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    kubeconfig: str | os.PathLike[str],
    timeout: float = 60,
) -> list[str]:
    """Apply CRD manifests (files/dirs/YAML text) and wait until they are Established.

    Returns the CRD names (``crd.group`` form).
    """
    out = apply_manifests(paths, kubeconfig=kubeconfig)
    names = []
    for line in out.splitlines():
        ref = line.split()[0] if line.strip() else ""
        if ref.startswith("customresourcedefinition.apiextensions.k8s.io/"):
            names.append(ref.split("/", 1)[1])
    deadline = time.monotonic() + timeout
    while names:
        p = kubectl(
            "wait", "--for=condition=Established", f"--timeout={int(timeout)}s",
            *[f"crd/{n}" for n in names], kubeconfig=kubeconfig, timeout=timeout + 10, check=False,
        )
        if p.returncode == 0:
            break
        # a CRD the apiserver has not given a status yet makes `kubectl wait` fail at once
        if "accessor error" not in p.stderr or time.monotonic() > deadline:
            raise KubectlError(p.returncode, p.args, p.stdout, p.stderr)
        time.sleep(0.3)
    return names
