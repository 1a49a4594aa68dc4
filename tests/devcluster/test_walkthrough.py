"""The README's Kubernetes walkthrough, run as written (the fenced block after the
`walkthrough:kubernetes` marker) against the test session's dev cluster: it must end with a
trained adapter on disk."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- walkthrough:kubernetes -->"


def walkthrough() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(re.escape(MARKER) + r"\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no ```bash block after {MARKER}"
    return m.group(1)


def release_demo_namespace(info, timeout: float = 120) -> None:
    """The block kills its operator once the task succeeds, so the group's pod would keep its kwok GPU
    for the rest of the session (later tests that need whole nodes would wait forever): delete the
    namespace and wait until its pods are gone."""
    import time

    info.kubectl("delete", "namespace", "demo", "--wait=false", check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = info.kubectl("get", "pods", "-n", "demo", "-o", "name", check=False).stdout.strip()
        if not pods:
            return
        time.sleep(1)
    raise TimeoutError(f"pods of namespace demo still present after {timeout}s: {pods}")


def test_readme_block_is_found_and_uses_only_documented_commands():
    script = walkthrough()
    assert "muxtune dev-cluster env" in script and "host-engines" in script and "kubectl apply" in script


def test_readme_kubernetes_walkthrough_ends_with_an_adapter_on_disk(kube_cluster, tmp_path):
    import shutil

    (tmp_path / "crds").symlink_to(REPO / "crds")
    shutil.copytree(REPO / "examples", tmp_path / "examples")  # the block copies it (cp -r keeps a link a link)
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}
    env.update(MUXTUNE_DEV_CLUSTER_DIR=str(kube_cluster.state_dir), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # `muxtune` as installed
    script = "set -euxo pipefail\n" + walkthrough()
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:  # background jobs the block left behind, if it failed early
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        release_demo_namespace(kube_cluster)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in (tmp_path / "k8s").glob("*.log"))
    assert proc.returncode == 0, out[-6000:] + logs
    adapter = tmp_path / "k8s" / "output" / "demo" / "reverse" / "adapter_model.safetensors"
    assert adapter.is_file() and adapter.stat().st_size > 0
    assert re.search(r"reverse\s+Succeeded\s+\S+\s+40/40\s+\d", out), out[-3000:]
