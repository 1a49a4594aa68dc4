"""What the kubelet would do for an engine pod that runs here as a process (kwok pods run nothing):
the group's ConfigMap mirrored into a tasks directory, and data files under the pod's data root."""
from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

from muxtune.devcluster import hostengines


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


class ConfigMapMirror(hostengines.ConfigMapMirror):
    """The kubelet's ConfigMap volume (muxtune.devcluster.hostengines), synced every 0.5 s by a thread."""

    def __init__(self, info, namespace: str, name: str, tasks_dir: Path, output: Path):
        super().__init__(info.kubectl, namespace, name, tasks_dir)
        self.info, self.output = info, output
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self.sync()


TASKS_DIR, OUTPUT, DATA = hostengines.TASKS_DIR, hostengines.OUTPUT, hostengines.DATA  # the engine pod's mounts


def host_command(pod: dict, tasks_dir: Path, out_dir: Path, data: Path, metrics_port: int) -> list[str]:
    """The pod's container command line with its paths and ports mapped onto this host."""
    c = pod["spec"]["containers"][0]
    argv = list(c.get("command") or []) + list(c.get("args") or [])
    assert argv[:2] == ["muxtune", "run"]
    assert [argv[argv.index(f) + 1] for f in ("--output", "--data-root", "--metrics-host")] == [OUTPUT, DATA, "0.0.0.0"]
    return hostengines.host_argv(argv, tasks_dir, out_dir, data, metrics_port, "cpu")


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
