"""End to end: FineTuneTasks applied with kubectl, packed by the operator (chart RBAC) into a group pod
the real scheduler binds to a kwok GPU node; the real engine runs that pod's own command line and
environment on this host (its ConfigMap materialised in place of /etc/muxtune/tasks, the group's key
Secret in place of /etc/muxtune/key, temp dirs in place of /data and /output), the operator polls it
through the muxtune.io/engine-endpoint annotation (--dev-endpoint-annotation), verifies its signed
reports, and status flows back until tasks are Succeeded with their adapters written. A forged
ConfigMap is refused by the engine; a killed engine shows as EngineReachable=False."""
from __future__ import annotations

import json
import urllib.request
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from muxtune.devcluster import hostengines

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]



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
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self.sync()


def test_engine_trains_a_group_pod_to_succeeded(operator_env, kh, tmp_path):
    info, ns, op = operator_env["info"], operator_env["b"], operator_env["op"]
    t_start = time.monotonic()
    data = tmp_path / "data"
    (data / ns).mkdir(parents=True)  # the namespace's own area: the pod mounts it at /data/<ns>
    area = data / ns
    tasks = [
        kh.task_manifest("e2e-rev", ns, data=write_data(area, "rev.jsonl", 48, 1), steps=4, batch=2, seq=48),
        kh.task_manifest("e2e-rev2", ns, data=write_data(area, "rev2.jsonl", 48, 2), steps=5, batch=2, seq=48),
        # a long task that is deleted mid-way: the engine drops it, its neighbours go on
        kh.task_manifest("e2e-long", ns, data=write_data(area, "long.jsonl", 48, 3), steps=100000, batch=2, seq=48),
        # keeps the group alive while e2e-long is removed (else an empty group is torn down instead)
        kh.task_manifest("e2e-keep", ns, data=write_data(area, "keep.jsonl", 48, 4), steps=100000, batch=2, seq=48),
    ]
    kh.apply(info, *tasks)
    names = [t["metadata"]["name"] for t in tasks]

    def ftt(name):
        return kh.kjson(info, "get", "finetunetask", name, "-n", ns)

    def one_group():
        gs = {(ftt(n).get("status") or {}).get("group") for n in names}
        return gs.pop() if len(gs) == 1 and None not in gs else None

    group = kh.wait_for(one_group, 60, what="all three tasks in one group")

    def bound_pod():
        pods = kh.kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={group}")["items"]
        return pods[0] if pods and pods[0]["spec"].get("nodeName") else None

    pod = kh.wait_for(bound_pod, 60, what="group pod bound by the scheduler")
    assert pod["spec"]["nodeName"] in info.gpu_nodes
    pod_uid = pod["metadata"]["uid"]
    container = pod["spec"]["containers"][0]
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    assert argv[:2] == ["muxtune", "run"]

    # materialise the ConfigMap volume and map the pod's paths onto this host
    tasks_dir, out_dir = tmp_path / "tasks", tmp_path / "output"
    tasks_dir.mkdir()
    out_dir.mkdir()
    mirror = ConfigMapMirror(info, ns, f"{group}-tasks", tasks_dir, out_dir)
    port = kh.free_port()
    assert [argv[argv.index(f) + 1] for f in ("--output", "--data-root", "--metrics-host")] == [hostengines.OUTPUT, hostengines.DATA, "0.0.0.0"]
    host_argv = hostengines.host_argv(argv, tasks_dir, out_dir, data, port, "cpu")
    # the pod's environment: its group and key (from the Secret the operator created for the group)
    pod_env = {e["name"]: e.get("value") for e in container["env"] if "value" in e}
    key_vol = next(v for v in pod["spec"]["volumes"] if v["name"] == "group-key")
    secret = kh.kjson(info, "get", "secret", key_vol["secret"]["secretName"], "-n", ns)
    import base64

    key_dir = tmp_path / "key"
    key_dir.mkdir()
    (key_dir / "key").write_bytes(base64.b64decode(secret["data"]["key"]))
    env = {**os.environ, "MUXTUNE_GROUP": pod_env["MUXTUNE_GROUP"],
           "MUXTUNE_GROUP_KEY_FILE": str(key_dir / "key"), "OMP_NUM_THREADS": "1"}
    assert pod_env["MUXTUNE_GROUP_KEY_FILE"] == "/etc/muxtune/key/key" and pod_env["MUXTUNE_GROUP"] == group
    engine_log = open(tmp_path / "engine.log", "w")
    engine = subprocess.Popen(host_argv, stdout=engine_log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                              env=env)
    try:
        # the engine is reached through the pod annotation (kwok pod IPs are fake)
        info.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", ns,
                     f"muxtune.io/engine-endpoint=http://127.0.0.1:{port}", "--overwrite")

        def running(name):
            st = ftt(name).get("status") or {}
            return st.get("phase") in ("Running", "Succeeded")

        kh.wait_for(lambda: running("e2e-long"), 240, interval=1, what="e2e-long Running (engine polled)")
        st = ftt("e2e-long")["status"]
        assert st["group"] == group and {c["type"]: c for c in st["conditions"]}["Running"]["status"] == "True"

        # hot remove with the real engine: delete the long task, the pod is not recreated
        info.kubectl("delete", "ftt", "e2e-long", "-n", ns)

        def finished():
            phases = {n: (ftt(n).get("status") or {}).get("phase") for n in ("e2e-rev", "e2e-rev2")}
            return phases if all(p in ("Succeeded", "Failed") for p in phases.values()) else None

        phases = kh.wait_for(finished, 300, interval=1, what="e2e-rev and e2e-rev2 finished")
        assert phases == {"e2e-rev": "Succeeded", "e2e-rev2": "Succeeded"}, (tmp_path / "engine.log").read_text()[-3000:]
        for name, steps in (("e2e-rev", 4), ("e2e-rev2", 5)):
            st = ftt(name)["status"]
            assert st["step"] == steps and st["totalSteps"] == steps and st["progress"] == f"{steps}/{steps}"
            assert st["loss"] is not None and st["loss"] > 0
            assert st.get("completionTime") and st.get("startTime")
            conds = {c["type"]: c for c in st["conditions"]}
            assert conds["Complete"]["status"] == "True" and conds["Complete"]["reason"] == "Succeeded"
            adapter = out_dir / ns / name
            assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
        table = info.kubectl("get", "ftt", "-n", ns).stdout
        print(table)
        assert table.count("Succeeded") >= 2 and "4/4" in table and "5/5" in table

        # hot remove: the deleted task leaves the group's ConfigMap and the running engine drops it
        # (it never finishes); waited for, since short neighbours may finish before the patch lands
        kh.wait_for(lambda: "e2e-long" not in (tasks_dir / "tasks.yaml").read_text(), 60,
                    what="e2e-long removed from the group's ConfigMap")
        assert "e2e-keep" in (tasks_dir / "tasks.yaml").read_text()

        def engine_tasks():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as r:
                return json.load(r)["tasks"]

        kh.wait_for(lambda: f"{ns}/e2e-long" not in engine_tasks(), 60, what="the engine dropped e2e-long")
        assert engine.poll() is None, "the engine must keep running: membership changes do not restart it"
        assert not (out_dir / ns / "e2e-long" / "adapter_model.safetensors").exists()
        assert mirror.updates >= 2
        def reasons(name):
            return {e["reason"] for e in kh.kjson(info, "get", "events", "-n", ns,
                                                   "--field-selector", f"involvedObject.name={name}")["items"]}

        # a 4-step task may finish between two polls (Placed -> Succeeded); e2e-long was seen Running
        assert {"Placed", "Succeeded"} <= reasons("e2e-rev")
        assert {"Placed", "Running"} <= reasons("e2e-long")

        # a tenant's edit of the mounted ConfigMap (another namespace's task, unsigned) reaches the
        # engine, which refuses it and keeps training what the operator signed
        mirror.stop.set()
        mirror.thread.join()
        (tasks_dir / "tasks.yaml").write_text(yaml.safe_dump(kh.task_manifest("intruder", "team-x", steps=3)))
        kh.wait_for(lambda: "task files not applied" in (tmp_path / "engine.log").read_text(), 60,
                    what="the engine refuses the forged tasks file")
        assert "team-x/intruder" not in engine_tasks() and f"{ns}/e2e-keep" in engine_tasks()
        mirror.sync()  # the kubelet delivers the operator's signed file again

        # the engine dies: after a few failed polls its tasks say so, and since when
        engine.kill()
        engine.wait()
        kh.wait_for(lambda: {c["type"]: c for c in ftt("e2e-keep")["status"]["conditions"]}
                    .get("EngineReachable", {}).get("status") == "False", 60, what="EngineReachable=False")
        assert "has not answered since" in ftt("e2e-keep")["status"]["message"]

        # the last active member leaves: the group is torn down and its GPU released
        info.kubectl("delete", "ftt", "e2e-keep", "-n", ns)
        def torn_down():
            gs = kh.kjson(info, "get", "backbonegroups", "-n", ns)["items"]
            return not [g for g in gs if g["metadata"]["name"] == group]

        kh.wait_for(torn_down, 60, what="group torn down")
        kh.wait_for(lambda: not [p for p in kh.kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={group}")["items"]
                                 if p["metadata"]["uid"] == pod_uid and not p["metadata"].get("deletionTimestamp")],
                    60, what="pod deleted with the group")
        m = op.metrics()
        assert "muxtune_operator_time_to_running_seconds_count" in m
        count = [ln for ln in m.splitlines() if ln.startswith("muxtune_operator_time_to_running_seconds_count")][0]
        assert float(count.split()[-1]) >= 1
        print(f"e2e wall time {time.monotonic() - t_start:.1f}s")
    finally:
        mirror.stop.set()
        if engine.poll() is None:
            engine.terminate()
            try:
                engine.wait(timeout=30)
            except subprocess.TimeoutExpired:
                engine.kill()
        engine_log.close()
        print("---- engine log (tail) ----\n" + "\n".join((tmp_path / "engine.log").read_text().splitlines()[-30:]))
