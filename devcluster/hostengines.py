"""Run the dev cluster's engine pods on this host: kwok nodes run no containers, so nothing would
ever train. For each engine pod the scheduler bound, this does what a kubelet would: the pod's own
command line and environment, its tasks ConfigMap materialised as files (and kept current, as a
ConfigMap volume is), its group key Secret as a file, /data and /output mapped to host directories.
It annotates the pod with the engine's address (muxtune.io/engine-endpoint: the operator must run
with --dev-endpoint-annotation), and stops an engine with SIGTERM (it checkpoints first) when its
pod goes. Development only: `muxtune dev-cluster host-engines`; the e2e tests use the same code.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

TASKS_DIR, OUTPUT, DATA, KEY_FILE = "/etc/muxtune/tasks", "/output", "/data", "/etc/muxtune/key/key"
ENGINE_SELECTOR = "app.kubernetes.io/component=engine,app.kubernetes.io/managed-by=muxtune-operator"
Kubectl = Callable[..., subprocess.CompletedProcess]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_argv(argv: list[str], tasks_dir: Path, output: Path, data: Path, port: int, device: str) -> list[str]:
    """The pod's `muxtune run ...` with its paths and port mapped onto this host."""
    out = [sys.executable, "-m", "muxtune.cli"]
    it = iter(argv[1:])
    for a in it:
        if a.startswith(TASKS_DIR):
            out.append(str(tasks_dir) + a[len(TASKS_DIR):])
        elif a in ("--output", "--data-root"):
            want = next(it)
            out += [a, str(output if want == OUTPUT else data)]
        elif a == "--metrics-port":
            next(it)
            out += ["--metrics-port", str(port)]
        elif a == "--metrics-host":
            next(it)
            out += ["--metrics-host", "127.0.0.1"]
        else:
            out.append(a)
    return out + ["--device", device]


class ConfigMapMirror:
    """What the kubelet does for a ConfigMap volume: tasks.yaml and tasks.yaml.sig equal to the
    ConfigMap, each file replaced atomically on change."""

    def __init__(self, kubectl: Kubectl, namespace: str, name: str, tasks_dir: Path):
        self.kubectl, self.ns, self.name, self.dir = kubectl, namespace, name, tasks_dir
        self.updates = 0
        tasks_dir.mkdir(parents=True, exist_ok=True)
        self.sync()

    def sync(self) -> None:
        p = self.kubectl("get", "configmap", self.name, "-n", self.ns, "-o", "json", check=False)
        if p.returncode != 0:
            return
        data = json.loads(p.stdout).get("data") or {}
        changed = False
        for name in ("tasks.yaml.sig", "tasks.yaml"):
            body, target = data.get(name, ""), self.dir / name
            if not target.exists() or target.read_text() != body:
                tmp = self.dir / f".{name}.tmp"
                tmp.write_text(body)
                os.replace(tmp, target)
                changed = True
        self.updates += changed


@dataclass
class HostEngine:
    pod: str
    namespace: str
    uid: str
    proc: subprocess.Popen
    mirror: ConfigMapMirror
    port: int


@dataclass
class HostEngines:
    kubectl: Kubectl
    data: Path  # the host directory standing for the data volume (a subdirectory per namespace)
    output: Path  # ... and for the output volume
    work: Path  # per-pod task files, keys and logs
    device: str = "cpu"
    engines: dict[str, HostEngine] = field(default_factory=dict)  # by pod uid
    namespace: str | None = None  # only this namespace's engine pods (None: every namespace)

    def step(self) -> None:
        """Start engines for newly bound pods, stop those whose pod is gone, refresh task files."""
        where = ["-n", self.namespace] if self.namespace else ["-A"]
        pods = json.loads(self.kubectl("get", "pods", *where, "-l", ENGINE_SELECTOR, "-o", "json").stdout)["items"]
        live = {p["metadata"]["uid"]: p for p in pods if not p["metadata"].get("deletionTimestamp")}
        for uid in [u for u in self.engines if u not in live]:
            self._stop(self.engines.pop(uid))
        for uid, pod in live.items():
            if uid not in self.engines and pod["spec"].get("nodeName"):
                self.engines[uid] = self._start(pod)
        for e in self.engines.values():
            e.mirror.sync()

    def run(self, interval: float = 0.5) -> None:
        try:
            while True:
                self.step()
                time.sleep(interval)
        finally:
            self.close()

    def close(self) -> None:
        for e in self.engines.values():
            self._stop(e)
        self.engines.clear()

    def _start(self, pod: dict) -> HostEngine:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name = meta["namespace"], meta["name"]
        c = spec["containers"][0]
        vols = {v["name"]: v for v in spec.get("volumes") or []}
        d = self.work / ns / f"{name}-{meta['uid'][:8]}"
        (d / "key").mkdir(parents=True, exist_ok=True)
        mirror = ConfigMapMirror(self.kubectl, ns, vols["tasks"]["configMap"]["name"], d / "tasks")
        secret = json.loads(self.kubectl("get", "secret", vols["group-key"]["secret"]["secretName"], "-n", ns,
                                         "-o", "json").stdout)
        (d / "key" / "key").write_bytes(base64.b64decode(secret["data"]["key"]))
        env = {**os.environ, **{e["name"]: e["value"] for e in c.get("env") or [] if "value" in e},
               "MUXTUNE_GROUP_KEY_FILE": str(d / "key" / "key"), "OMP_NUM_THREADS": "1"}
        port = free_port()
        self.output.mkdir(parents=True, exist_ok=True)
        argv = host_argv(list(c.get("command") or []) + list(c.get("args") or []), d / "tasks", self.output,
                         self.data, port, self.device)
        log = open(d / "engine.log", "a")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=d, env=env, start_new_session=True)
        self.kubectl("annotate", "pod", name, "-n", ns, f"muxtune.io/engine-endpoint=http://127.0.0.1:{port}",
                     "--overwrite", check=False)
        print(f"engine for pod {ns}/{name} started on the host (pid {proc.pid}, port {port}, log {d / 'engine.log'})",
              flush=True)
        return HostEngine(name, ns, meta["uid"], proc, mirror, port)

    @staticmethod
    def _stop(e: HostEngine) -> None:
        if e.proc.poll() is None:
            e.proc.send_signal(signal.SIGTERM)  # the engine checkpoints its running tasks first
            try:
                e.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                e.proc.kill()
                e.proc.wait()
        print(f"engine for pod {e.namespace}/{e.pod} stopped (exit {e.proc.returncode})", flush=True)
