"""Helpers for the operator's cluster tests: CRDs, the chart's RBAC, the operator as a subprocess."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "muxtune"
RELEASE = "mux"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(fn, timeout: float = 60, interval: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as e:  # noqa: BLE001
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def kjson(info, *args) -> dict:
    return json.loads(info.kubectl(*args, "-o", "json").stdout)


def ensure_crds(info) -> None:
    from muxtune.devcluster import cluster

    crd_dir = REPO / "crds"
    if not any(crd_dir.glob("*.yaml")):
        from muxtune.api import crdgen  # generate them when the repo has none yet

        crd_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"muxtune-crds-{uuid.uuid4().hex[:6]}"
        crd_dir.mkdir()
        crdgen.write_files(crd_dir)
    cluster.apply_crds(crd_dir, kubeconfig=info.kubeconfig)


def install_rbac(info, namespace: str, watch: list[str] | None = None) -> Path:
    """Render the chart's ServiceAccount + RBAC with helm (namespaced Roles when ``watch`` is given),
    apply them, and return a kubeconfig holding that ServiceAccount's token: the operator runs
    with exactly the chart's RBAC."""
    from muxtune.devcluster import cluster
    from muxtune.devcluster.build import ensure_binaries

    helm = ensure_binaries(["helm"])["helm"]
    release = f"{RELEASE}-{namespace}"[:40]
    extra = ["--set", "operator.watchNamespaces={" + ",".join(watch) + "}"] if watch else []
    extra += ["--set", "engine.output.hostPath=/var/lib/muxtune/output"]  # required by the values schema
    out = subprocess.run(
        [str(helm), "template", release, str(CHART), "--namespace", namespace, *extra,
         "--show-only", "templates/rbac.yaml", "--show-only", "templates/serviceaccount.yaml"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    info.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    return cluster.service_account_kubeconfig(info, namespace, sa, info.state_dir / "kubeconfigs" / f"op-{namespace}.kubeconfig")


@dataclass
class OperatorProcess:
    kubeconfig: Path
    namespaces: list[str]
    shared_namespace: str
    log_path: Path
    extra: list[str] = field(default_factory=list)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    dev_endpoint: bool = True  # honour muxtune.io/engine-endpoint (kwok pod IPs are fake)
    signing_key: Path | None = None
    env_extra: dict = field(default_factory=dict)

    def start(self) -> None:
        if self.signing_key is None:
            self.signing_key = self.log_path.parent / "signing.key"
            if not self.signing_key.exists():
                self.signing_key.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        args = [
            sys.executable, "-m", "muxtune.operator.cli", "operator",
            "--kubeconfig", str(self.kubeconfig),
            f"--namespaces={','.join(self.namespaces)}",
            "--shared-namespace", self.shared_namespace,
            "--metrics-port", str(self.metrics_port),
            "--no-poll-pod-ip",  # kwok pod IPs are fake; engines are reached through the annotation only
            *(["--dev-endpoint-annotation"] if self.dev_endpoint else []),
            "--signing-key-file", str(self.signing_key),
            "--lease-duration", "4", "--lease-renew-interval", "0.5",
            "--pod-backoff-base", "2",
            "--poll-interval", "1",
            "--engine-image", "registry.invalid/muxtune/engine:test",
            "--output-host-path", "/var/lib/muxtune/output",  # persistent output is required; kwok mounts nothing
            "--log-level", "info",  # readiness is read from the log ("indices populated")
            *self.extra,
        ]
        env = dict(os.environ)
        env.pop("KUBECONFIG", None)
        env.update(self.env_extra)
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def metrics(self) -> str:
        import urllib.request

        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def group_key(self, group: dict) -> bytes:
        from muxtune.operator.keys import GroupKeys

        return GroupKeys(self.signing_key.read_bytes().strip()).key(group)


def task_manifest(name: str, namespace: str, *, base: str = "builtin:tiny-llama", data: str = "d.jsonl",
                  steps: int = 4, batch: int = 2, seq: int = 48, priority: int = 0, suspend: bool = False,
                  labels: dict | None = None, share: bool = False) -> dict:
    return {
        "apiVersion": "muxtune.io/v1alpha1",
        "kind": "FineTuneTask",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "baseModel": base,
            "dataset": {"path": data, "maxSeqLen": seq},
            "peft": {"method": "lora", "r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "training": {"maxSteps": steps, "batchSize": batch, "learningRate": 0.005, "checkpointInterval": 0},
            "priority": priority,
            "suspend": suspend,
            "shareAcrossNamespaces": share,
        },
    }


def apply(info, *docs: dict) -> None:
    info.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(list(docs)))


# ---------------------------------------------------------------------- fixtures

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def kh():
    """This module, for helper functions (tests/operator has no package to import from)."""
    return sys.modules[__name__]


@pytest.fixture(scope="module")
def operator_env(kube_cluster, tmp_path_factory, request):
    """CRDs, the chart's namespaced RBAC, two tenant namespaces, and the operator running as the
    chart's ServiceAccount (watching only those namespaces). Yields a dict of handles. A test module
    may set OPERATOR_ARGS (extra flags) and OPERATOR_DEV_ENDPOINT (default True)."""
    tag = uuid.uuid4().hex[:6]
    system, ns_a, ns_b = f"mtsys-{tag}", f"team-a-{tag}", f"team-b-{tag}"
    for ns in (system, ns_a, ns_b):
        kube_cluster.kubectl("create", "namespace", ns)
    from muxtune.devcluster import cluster

    for ns in (system, ns_a, ns_b):
        cluster.wait_for_default_service_account(kube_cluster, ns)
    ensure_crds(kube_cluster)
    sa_kubeconfig = install_rbac(kube_cluster, system, watch=[ns_a, ns_b])
    logdir = tmp_path_factory.mktemp("operator")
    op = OperatorProcess(sa_kubeconfig, [ns_a, ns_b], system, logdir / "operator.log",
                         extra=list(getattr(request.module, "OPERATOR_ARGS", [])),
                         dev_endpoint=getattr(request.module, "OPERATOR_DEV_ENDPOINT", True))
    op.start()
    env = {"info": kube_cluster, "op": op, "system": system, "a": ns_a, "b": ns_b, "tmp": logdir}
    try:
        yield env
    finally:
        env["op"].stop()
        print("---- operator log (tail) ----\n" + "\n".join(env["op"].log_text().splitlines()[-60:]))
        for ns in (ns_a, ns_b, system):
            kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
