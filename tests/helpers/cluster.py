"""The operator's cluster tests' side of a control plane: waiting, kubectl JSON, applying manifests,
CRDs, the chart's RBAC, and the operator as a subprocess."""
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

from tests.helpers.paths import CHART, REPO

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
    status_token_file: Path | None = None  # the engines' status-port token, as the chart's Secret holds it
    env_extra: dict = field(default_factory=dict)

    def start(self) -> None:
        if self.signing_key is None:
            self.signing_key = self.log_path.parent / "signing.key"
            if not self.signing_key.exists():
                self.signing_key.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        if self.status_token_file is None:
            self.status_token_file = self.log_path.parent / "status.token"
            if not self.status_token_file.exists():
                self.status_token_file.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        args = [
            sys.executable, "-m", "muxtune.operator.cli", "operator",
            "--kubeconfig", str(self.kubeconfig),
            f"--namespaces={','.join(self.namespaces)}",
            "--shared-namespace", self.shared_namespace,
            "--metrics-port", str(self.metrics_port),
            "--no-poll-pod-ip",  # kwok pod IPs are fake; engines are reached through the annotation only
            *(["--dev-endpoint-annotation"] if self.dev_endpoint else []),
            "--signing-key-file", str(self.signing_key),
            "--status-token-file", str(self.status_token_file),
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

    @property
    def status_auth(self) -> dict[str, str]:
        """The header the operator (and Prometheus) send to an engine's /v1/status and /metrics."""
        return {"Authorization": f"Bearer {self.status_token_file.read_text().strip()}"}

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


# The BaseModels below run the built-in tiny-llama but describe a model no single node/GPU holds.
# Every shape figure is typed: the operator fills untyped ones from the source's config.json
# (tiny-llama's head_dim 32, intermediate_size 352), which would make these models small again.
# two pods x 8 GPUs: more than one kwok node holds (the figures of a 200B-parameter, 8-layer model)
WHOLE_NODES = {"parameters": 200_000_000_000, "layers": 8, "hiddenSize": 16384, "numAttentionHeads": 1,
               "numKeyValueHeads": 1, "headDim": 16384, "intermediateSize": 131072, "vocabSize": 259}
# two pods x 1 GPU: one layer and one head leave only data parallelism; one GPU holds half the step
TWO_REPLICAS = {"parameters": 10_000_000, "layers": 1, "hiddenSize": 65536, "numAttentionHeads": 1,
                "numKeyValueHeads": 1, "headDim": 65536, "intermediateSize": 174762, "vocabSize": 259}


def basemodel(name: str, ns: str, figures: dict) -> dict:
    return {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": name},
            "spec": {"source": {"builtin": "tiny-llama"}, "allowedNamespaces": [ns], "architecture": figures}}
