"""What the kubelet would do for an engine pod that runs here as a process (kwok pods run nothing):
the group's ConfigMap mirrored into a tasks directory, and data files under the pod's data root."""
from __future__ import annotations

import base64
import json
import os
import sys
import threading
from pathlib import Path


def write_data(root: Path, name: str, n: int, seed: int) -> str:
    """Writes root/name; returns the dataset.path (relative to the engine's --data-root)."""
    import random

    path = root / name

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 10)))
            f.write(json.dumps({"prompt": f"reverse: {w}\n", "completion": w[::-1]}) + "\n")
    return name


class ConfigMapMirror:
    """Does what the kubelet does for a ConfigMap volume: keeps tasks.yaml and tasks.yaml.sig equal
    to the ConfigMap, replacing each file atomically on change."""

    def __init__(self, info, namespace: str, name: str, tasks_dir: Path, output: Path):
        self.info, self.ns, self.name, self.dir, self.output = info, namespace, name, tasks_dir, output
        self.stop = threading.Event()
        self.updates = 0
        self.sync()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def sync(self) -> None:
        p = self.info.kubectl("get", "configmap", self.name, "-n", self.ns, "-o", "json", check=False)
        if p.returncode != 0:
            return
        data = json.loads(p.stdout)["data"]
        changed = False
        for name in ("tasks.yaml.sig", "tasks.yaml"):
            body = data.get(name, "")
            target = self.dir / name
            if not target.exists() or target.read_text() != body:
                tmp = self.dir / f".{name}.tmp"
                tmp.write_text(body)
                os.replace(tmp, target)
                changed = True
        self.updates += changed

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self.sync()


TASKS_DIR, OUTPUT, DATA = "/etc/muxtune/tasks", "/output", "/data"  # the engine pod's mounts


def host_command(pod: dict, tasks_dir: Path, out_dir: Path, data: Path, metrics_port: int) -> list[str]:
    """The pod's container command line with its paths and ports mapped onto this host."""
    c = pod["spec"]["containers"][0]
    argv = list(c.get("command") or []) + list(c.get("args") or [])
    assert argv[:2] == ["muxtune", "run"]
    out = [sys.executable, "-m", "muxtune.cli"]
    it = iter(argv[1:])
    mapped = {"--output": (OUTPUT, str(out_dir)), "--data-root": (DATA, str(data)),
              "--metrics-host": ("0.0.0.0", "127.0.0.1"), "--metrics-port": (None, str(metrics_port))}
    for a in it:
        if a.startswith(TASKS_DIR):
            out.append(str(tasks_dir) + a[len(TASKS_DIR):])
        elif a in mapped:
            want, host = mapped[a]
            value = next(it)
            assert want is None or value == want, (a, value)  # pods bind all interfaces explicitly
            out += [a, host]
        else:
            out.append(a)
    return out + ["--device", "cpu"]


def pod_env(pod: dict) -> dict[str, str]:
    """The engine container's literal environment variables."""
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"] if "value" in e}


def write_group_key(info, namespace: str, pods: list[dict], key_dir: Path) -> Path:
    """The group's key, from the Secret every pod of the group mounts, written where the pod reads it."""
    secrets = {next(v for v in p["spec"]["volumes"] if v["name"] == "group-key")["secret"]["secretName"] for p in pods}
    assert len(secrets) == 1, "every pod of a group mounts the same key"
    secret = json.loads(info.kubectl("get", "secret", secrets.pop(), "-n", namespace, "-o", "json").stdout)
    key_dir.mkdir()
    (key_dir / "key").write_bytes(base64.b64decode(secret["data"]["key"]))
    return key_dir / "key"
