"""Build the local control-plane binaries from the Go module proxy, once.

Binaries land in ``$MUXTUNE_CACHE_DIR/bin`` (default ``~/.cache/muxtune/bin``);
the Go module and build caches live under ``$MUXTUNE_CACHE_DIR/go`` so a second
build (or a CI run on the same machine) is warm.  Every binary has a stamp keyed
by its version and by the hash of the pinned wrapper module (``devcluster/go``),
so re-running is a no-op that takes well under a second.

Usage::

    python -m muxtune.devcluster.build            # build whatever is missing
    python -m muxtune.devcluster.build --force    # rebuild everything
    python -m muxtune.devcluster.build --print-bin-dir

Why wrapper modules: ``go install k8s.io/kubernetes/cmd/...`` fails by design
(k8s.io/kubernetes replaces its ``k8s.io/*`` staging modules with relative
paths), and ``go.etcd.io/etcd/server/v3`` does the same for its siblings.  The
modules under ``devcluster/go/<group>/`` require the real module and replace
each staging/sibling module with its published version; their go.sum files are
committed, so builds are reproducible and need no ``go mod tidy``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.19.5"
# the newest Kueue release whose k8s.io modules are v0.34 (v0.16+ move to v0.35); built only on request
KUEUE_VERSION = "v0.15.2"

GO_DIR = Path(__file__).resolve().parent / "go"

KUEUE_METRICS_CERT_DIR_GO = """// Added by muxtune's devcluster build (go build -overlay); not part of Kueue.
package main

import "os"

// muxtuneMetricsCertDir returns $KUEUE_METRICS_CERT_DIR, else def (the upstream path).
func muxtuneMetricsCertDir(def string) string {
	if d := os.Getenv("KUEUE_METRICS_CERT_DIR"); d != "" {
		return d
	}
	return def
}
"""


def cache_dir() -> Path:
    """Root of the muxtune cache (``$MUXTUNE_CACHE_DIR`` or ``~/.cache/muxtune``)."""
    env = os.environ.get("MUXTUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "muxtune"


def bin_dir() -> Path:
    return cache_dir() / "bin"


@dataclass(frozen=True)
class PatchedMain:
    """Build a module's main package from its own sources with exact one-line replacements.

    Go refuses ``-overlay`` entries under GOMODCACHE, so the package's files (read from the module
    cache at build time) are overlaid, patched, into the wrapper module as ``<wrapper>/<package>``
    and built from there; nothing is written into the module cache or the git tree.  The package
    must import no ``internal/`` package of its module.  A replacement whose text is not found
    exactly once fails the build, so a version bump must revisit it."""

    package: str  # directory of the main package inside the module, e.g. cmd/kueue
    replacements: tuple[tuple[str, str, str], ...]  # (file name, old, new)
    added: tuple[tuple[str, str], ...] = ()  # (file name, Go source) added to the package


@dataclass(frozen=True)
class Group:
    """One wrapper module, built with one ``go build`` invocation."""

    name: str
    module: str  # module whose version is the group's version
    version: str
    binaries: dict[str, str]  # binary name -> main package
    ldflags: tuple[str, ...] = field(default_factory=tuple)
    patched_main: PatchedMain | None = None  # only with one binary
    share: tuple[str, ...] = ()  # module dirs copied to share_dir() after the build (manifests the cluster applies)
    optional: bool = False  # built only when named (not by a plain ensure_binaries())

    @property
    def moddir(self) -> Path:
        return GO_DIR / self.name


def _k8s_ldflags(version: str) -> tuple[str, ...]:
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return tuple(flags)


GROUPS: dict[str, Group] = {
    g.name: g
    for g in (
        Group(
            "kubernetes",
            "k8s.io/kubernetes",
            KUBERNETES_VERSION,
            {
                "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
                "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
                "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
                "kubectl": "k8s.io/kubernetes/cmd/kubectl",
            },
            _k8s_ldflags(KUBERNETES_VERSION),
        ),
        Group("etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION, {"etcd": "go.etcd.io/etcd/server/v3"}),
        Group(
            "kwok",
            "sigs.k8s.io/kwok",
            KWOK_VERSION,
            {"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
            (f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION.lstrip('v')}",),
        ),
        Group(
            "helm",
            "helm.sh/helm/v3",
            HELM_VERSION,
            {"helm": "helm.sh/helm/v3/cmd/helm"},
            (f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}", "-X helm.sh/helm/v3/internal/version.gitTreeState=clean"),
        ),
        Group(
            "kueue",
            "sigs.k8s.io/kueue",
            KUEUE_VERSION,
            {"kueue": "sigs.k8s.io/kueue/cmd/kueue"},
            (f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE_VERSION}", "-X sigs.k8s.io/kueue/pkg/version.BuildDate=1970-01-01T00:00:00Z"),
            # With internal cert management off, cmd/kueue reads its metrics serving cert from a path
            # fixed in the source (the upstream pod mounts a Secret there). A process on this machine
            # cannot have /etc/kueue without root, so the path becomes $KUEUE_METRICS_CERT_DIR when set.
            patched_main=PatchedMain(
                "cmd/kueue",
                (("main.go", 'metricsCertPath := "/etc/kueue/metrics/certs"',
                  'metricsCertPath := muxtuneMetricsCertDir("/etc/kueue/metrics/certs")'),),
                (("zz_muxtune_metrics_cert_dir.go", KUEUE_METRICS_CERT_DIR_GO),),
            ),
            share=("config/components/crd", "config/components/webhook"),
            optional=True,
        ),
    )
}

BINARIES: dict[str, Group] = {b: g for g in GROUPS.values() for b in g.binaries}
# what a plain build (`muxtune dev-cluster build`, the kube_cluster fixture) makes
DEFAULT_BINARIES: tuple[str, ...] = tuple(b for b, g in BINARIES.items() if not g.optional)

# Stage configs (node/pod lifecycle) shipped in the kwok module, concatenated
# into one file passed to ``kwok --config``.  Same set kwokctl uses by default.
KWOK_STAGE_FILES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


def _log(msg: str) -> None:
    print(f"[muxtune.devcluster.build] {msg}", file=sys.stderr, flush=True)


def go_env() -> dict[str, str]:
    """Environment for the ``go`` command: caches under the muxtune cache, static, trimmed."""
    env = dict(os.environ)
    root = cache_dir() / "go"
    env.update(
        GOMODCACHE=str(root / "mod"),
        GOCACHE=str(root / "build"),
        GOPATH=str(root / "path"),
        CGO_ENABLED="0",
        GOFLAGS="-mod=readonly -buildvcs=false",
        GOWORK="off",
    )
    # 'auto' still uses the local Go if it is new enough (>= the go lines of the
    # wrapper modules, 1.26.0), and otherwise fetches one from the module proxy.
    env.setdefault("GOTOOLCHAIN", "auto")
    return env


def _stamp_key(group: Group) -> str:
    h = hashlib.sha256()
    for f in ("go.mod", "go.sum"):
        h.update((group.moddir / f).read_bytes())
    h.update("\0".join(group.ldflags).encode())
    if group.patched_main:
        h.update(repr(group.patched_main).encode())
    h.update("\0".join(group.share).encode())
    return f"{group.module}@{group.version} wrapper={h.hexdigest()[:16]}"


def _stamp_path(binary: str) -> Path:
    return bin_dir() / ".stamps" / f"{binary}.stamp"


def bin_path(binary: str) -> Path:
    """Path of a built binary (whether or not it exists yet)."""
    if binary not in BINARIES:
        raise KeyError(f"unknown binary {binary!r}; known: {sorted(BINARIES)}")
    return bin_dir() / binary


def kwok_stages_path() -> Path:
    return cache_dir() / "share" / f"kwok-{KWOK_VERSION}" / "stages.yaml"


def share_dir(group: str) -> Path:
    """Where a group's ``share`` directories are copied from its module (``share/<name>-<version>``)."""
    g = GROUPS[group]
    return cache_dir() / "share" / f"{g.name}-{g.version}"


def _is_fresh(binary: str) -> bool:
    p, s = bin_path(binary), _stamp_path(binary)
    if not (p.is_file() and os.access(p, os.X_OK) and s.is_file()):
        return False
    if binary == "kwok" and not kwok_stages_path().is_file():
        return False
    if any(not (share_dir(BINARIES[binary].name) / rel).is_dir() for rel in BINARIES[binary].share):
        return False
    return s.read_text().strip() == _stamp_key(BINARIES[binary])


def missing_binaries(names: list[str] | None = None) -> list[str]:
    """Binaries (of ``names``, default :data:`DEFAULT_BINARIES`) that are absent or built from other versions."""
    return [b for b in (names or list(DEFAULT_BINARIES)) if not _is_fresh(b)]


@contextlib.contextmanager
def _lock():
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"command failed (rc={rc}): {' '.join(cmd)}\n--- last lines of {log} ---\n{tail}")


def _module_dir(group: Group, env: dict[str, str]) -> Path:
    out = subprocess.run(
        ["go", "list", "-m", "-f", "{{.Dir}}", group.module],
        cwd=group.moddir, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()
    return Path(out)


def _write_kwok_stages(group: Group, env: dict[str, str]) -> None:
    src = _module_dir(group, env)
    docs = []
    for rel in KWOK_STAGE_FILES:
        text = (src / rel).read_text().strip()
        docs.append(f"# from sigs.k8s.io/kwok@{group.version}/{rel}\n{text.removeprefix('---').strip()}\n")
    dest = kwok_stages_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text("---\n".join(docs))
    tmp.replace(dest)


def _copy_share(group: Group, env: dict[str, str]) -> None:
    src = _module_dir(group, env)
    dest = share_dir(group.name)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in group.share:
        shutil.copytree(src / rel, tmp / rel)
        for f in (tmp / rel).rglob("*"):  # the module cache is read-only; keep the copy removable
            f.chmod(0o755 if f.is_dir() else 0o644)
    (tmp / "SOURCE").write_text(f"{group.module}@{group.version}\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def _write_overlay(group: Group, env: dict[str, str], tmp: Path) -> tuple[Path, str]:
    """The ``go build -overlay`` file for ``group.patched_main`` and the import path to build."""
    pm = group.patched_main
    assert pm is not None
    src = _module_dir(group, env) / pm.package
    wrapper = subprocess.run(["go", "list", "-m"], cwd=group.moddir, env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
    dest = group.moddir / pm.package  # exists only in the overlay
    tmp.mkdir(parents=True, exist_ok=True)
    files = {f.name: f.read_text() for f in src.glob("*.go") if not f.name.endswith("_test.go")}
    for name, old, new in pm.replacements:
        if files.get(name, "").count(old) != 1:
            raise RuntimeError(f"{group.module}@{group.version}: {pm.package}/{name} no longer has exactly one {old!r}; "
                               "revisit the PatchedMain in build.py")
        files[name] = files[name].replace(old, new)
    files.update(dict(pm.added))
    replace = {}
    for name, text in files.items():
        (tmp / name).write_text(text)
        replace[str(dest / name)] = str(tmp / name)
    overlay = tmp / "overlay.json"
    overlay.write_text(json.dumps({"Replace": replace}, indent=2))
    return overlay, f"{wrapper}/{pm.package}"


def _build_group(group: Group, binaries: list[str], jobs_per_build: int | None) -> float:
    env = go_env()
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"build-{group.name}.log"
    log.write_text("")
    start = time.monotonic()
    _log(f"{group.name} {group.version}: downloading modules")
    _run_logged(["go", "mod", "download"], group.moddir, env, log)
    _log(f"{group.name} {group.version}: compiling {', '.join(binaries)} ({time.monotonic() - start:.0f}s)")
    bdir = bin_dir()
    (bdir / ".stamps").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bdir, prefix=f".tmp-{group.name}-") as tmp:
        cmd = ["go", "build", "-trimpath"]
        if jobs_per_build:
            cmd += [f"-p={jobs_per_build}"]
        targets = [group.binaries[b] for b in binaries]
        if group.patched_main:
            overlay, target = _write_overlay(group, env, Path(tmp) / "overlay")
            cmd += [f"-overlay={overlay}"]
            targets = [target]
        # one binary: name it explicitly (go would call go.etcd.io/etcd/server/v3 "server")
        out = os.path.join(tmp, binaries[0]) if len(binaries) == 1 else tmp + "/"
        cmd += ["-ldflags", " ".join(("-s", "-w", *group.ldflags)), "-o", out]
        cmd += targets
        _run_logged(cmd, group.moddir, env, log)
        if group.name == "kwok":
            _write_kwok_stages(group, env)
        if group.share:
            _copy_share(group, env)
        key = _stamp_key(group)
        for b in binaries:
            built = Path(tmp) / b
            if not built.is_file():  # several packages: go names each after its directory
                raise RuntimeError(f"go build did not produce {b} in {tmp}: {os.listdir(tmp)}")
            os.replace(built, bin_path(b))  # atomic: users never see half-written binaries
            _stamp_path(b).write_text(key + "\n")
    took = time.monotonic() - start
    _log(f"{group.name} {group.version}: done in {took:.0f}s")
    return took


def ensure_binaries(
    names: list[str] | None = None,
    *,
    force: bool = False,
    jobs: int | None = None,
) -> dict[str, Path]:
    """Build the requested binaries (default: :data:`DEFAULT_BINARIES`, i.e. all but Kueue)
    if missing; return ``{name: path}``.

    Idempotent and safe to call concurrently (a file lock serialises builders).
    ``jobs`` is the number of ``go build`` invocations run side by side
    (default: 2 when more than one group needs building, since linking is
    single-threaded and overlaps well with the other build's compilation).
    """
    names = list(names or DEFAULT_BINARIES)
    for n in names:
        bin_path(n)  # validates names
    # Fresh stamps need no lock: a builder of other binaries (Kueue, say) must not hold up a
    # test whose binaries are already built.
    if not force and not missing_binaries(names):
        return {n: bin_path(n) for n in names}
    if shutil.which("go") is None:
        raise RuntimeError("the 'go' command is needed to build the dev-cluster binaries (Go >= 1.24)")
    with _lock():
        todo = names if force else missing_binaries(names)
        if not todo:
            return {n: bin_path(n) for n in names}
        per_group: dict[str, list[str]] = {}
        for b in todo:
            per_group.setdefault(BINARIES[b].name, []).append(b)
        # biggest first so the long pole starts immediately
        order = [g for g in GROUPS if g in per_group]
        workers = jobs or min(2, len(order))
        _log(f"building {', '.join(todo)} into {bin_dir()} ({workers} parallel go builds, caches in {cache_dir() / 'go'})")
        start = time.monotonic()
        errors: list[BaseException] = []
        lock = threading.Lock()

        def one(gname: str) -> None:
            try:
                _build_group(GROUPS[gname], per_group[gname], None)
            except BaseException as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(e)
                _log(f"{gname}: FAILED")

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, order))
        if errors:
            raise RuntimeError("\n\n".join(str(e) for e in errors))
        _log(f"all done in {time.monotonic() - start:.0f}s")
    return {n: bin_path(n) for n in names}


def versions() -> dict[str, str]:
    return {b: g.version for b, g in BINARIES.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m muxtune.devcluster.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("binaries", nargs="*", help=f"subset to build (default {' '.join(DEFAULT_BINARIES)}; also: kueue)")
    ap.add_argument("--force", action="store_true", help="rebuild even if stamps are fresh")
    ap.add_argument("--jobs", type=int, default=None, help="parallel go builds (default 2)")
    ap.add_argument("--print-bin-dir", action="store_true", help="only print the bin dir")
    ap.add_argument("--check", action="store_true", help="exit 1 if anything needs building, build nothing")
    ap.add_argument("--json", action="store_true", help="print {name: path} as JSON")
    a = ap.parse_args(argv)
    if a.print_bin_dir:
        print(bin_dir())
        return 0
    if a.check:
        miss = missing_binaries(a.binaries or None)
        for m in miss:
            print(m)
        return 1 if miss else 0
    t = time.monotonic()
    paths = ensure_binaries(a.binaries or None, force=a.force, jobs=a.jobs)
    _log(f"binaries ready in {time.monotonic() - t:.1f}s")
    if a.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    else:
        print(bin_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
