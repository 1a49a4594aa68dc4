"""End to end: FineTuneTasks applied with kubectl, packed by the operator (chart RBAC) into a group pod
the real scheduler binds to a kwok GPU node; the real engine runs that pod's own command line and
environment on this host (its ConfigMap materialised in place of /etc/muxtune/tasks, the group's key
Secret in place of /etc/muxtune/key, temp dirs in place of /data and /output), the operator polls it
through the muxtune.io/engine-endpoint annotation (--dev-endpoint-annotation), verifies its signed
reports, and status flows back until tasks are Succeeded with their adapters written. A forged
ConfigMap is refused by the engine; a killed engine shows as EngineReachable=False."""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.helpers.cluster import apply, free_port, kjson, task_manifest, wait_for
from tests.helpers.kubelet import ConfigMapMirror, host_command, pod_env, write_data, write_group_key

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@dataclass
class HostEngine:
    """The group pod's engine, running here: its ConfigMap mirrored, its port and paths mapped."""

    info: object
    ns: str
    group: str
    tmp: Path
    port: int = field(default_factory=free_port)
    auth: dict = field(default_factory=dict)  # the operator's status token header
    proc: subprocess.Popen | None = None
    mirror: ConfigMapMirror | None = None

    @property
    def tasks_dir(self) -> Path:
        return self.tmp / "tasks"

    @property
    def out_dir(self) -> Path:
        return self.tmp / "output"

    @property
    def log_path(self) -> Path:
        return self.tmp / "engine.log"

    def start(self, pod: dict, data: Path) -> None:
        self.tasks_dir.mkdir()
        self.out_dir.mkdir()
        self.mirror = ConfigMapMirror(self.info, self.ns, f"{self.group}-tasks", self.tasks_dir, self.out_dir)
        argv = host_command(pod, self.tasks_dir, self.out_dir, data, self.port)
        # the pod's environment: its group and key (from the Secret the operator created for the group)
        env = pod_env(pod)
        assert env["MUXTUNE_GROUP_KEY_FILE"] == "/etc/muxtune/key/key" and env["MUXTUNE_GROUP"] == self.group
        key = write_group_key(self.info, self.ns, [pod], self.tmp / "key")
        run_env = {**os.environ, "MUXTUNE_GROUP": env["MUXTUNE_GROUP"], "MUXTUNE_GROUP_KEY_FILE": str(key),
                   "OMP_NUM_THREADS": "1"}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                     start_new_session=True, env=run_env)
        # the engine is reached through the pod annotation (kwok pod IPs are fake)
        self.info.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", self.ns,
                          f"muxtune.io/engine-endpoint=http://127.0.0.1:{self.port}", "--overwrite")

    def tasks(self) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/status", headers=self.auth)
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)["tasks"]

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.mirror:
            self.mirror.stop.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc:
            self._log.close()
        print("---- engine log (tail) ----\n" + "\n".join(self.log().splitlines()[-30:]))


def ftt(info, ns, name) -> dict:
    return kjson(info, "get", "finetunetask", name, "-n", ns)


def apply_four_tasks(info, ns: str, area: Path) -> list[str]:
    tasks = [
        task_manifest("e2e-rev", ns, data=write_data(area, "rev.jsonl", 48, 1), steps=4, batch=2, seq=48),
        task_manifest("e2e-rev2", ns, data=write_data(area, "rev2.jsonl", 48, 2), steps=5, batch=2, seq=48),
        # a long task that is deleted mid-way: the engine drops it, its neighbours go on
        task_manifest("e2e-long", ns, data=write_data(area, "long.jsonl", 48, 3), steps=100000, batch=2, seq=48),
        # keeps the group alive while e2e-long is removed (else an empty group is torn down instead)
        task_manifest("e2e-keep", ns, data=write_data(area, "keep.jsonl", 48, 4), steps=100000, batch=2, seq=48),
    ]
    apply(info, *tasks)
    return [t["metadata"]["name"] for t in tasks]


def one_group_and_bound_pod(info, ns: str, names: list[str]) -> tuple[str, dict]:
    def one_group():
        gs = {(ftt(info, ns, n).get("status") or {}).get("group") for n in names}
        return gs.pop() if len(gs) == 1 and None not in gs else None

    group = wait_for(one_group, 60, what="all three tasks in one group")

    def bound_pod():
        pods = kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={group}")["items"]
        return pods[0] if pods and pods[0]["spec"].get("nodeName") else None

    pod = wait_for(bound_pod, 60, what="group pod bound by the scheduler")
    assert pod["spec"]["nodeName"] in info.gpu_nodes
    return group, pod


def check_running_then_short_tasks_succeed(info, ns: str, group: str, engine: HostEngine) -> None:
    def running(name):
        st = ftt(info, ns, name).get("status") or {}
        return st.get("phase") in ("Running", "Succeeded")

    wait_for(lambda: running("e2e-long"), 240, interval=1, what="e2e-long Running (engine polled)")
    st = ftt(info, ns, "e2e-long")["status"]
    assert st["group"] == group and {c["type"]: c for c in st["conditions"]}["Running"]["status"] == "True"

    # hot remove with the real engine: delete the long task, the pod is not recreated
    info.kubectl("delete", "ftt", "e2e-long", "-n", ns)

    def finished():
        phases = {n: (ftt(info, ns, n).get("status") or {}).get("phase") for n in ("e2e-rev", "e2e-rev2")}
        return phases if all(p in ("Succeeded", "Failed") for p in phases.values()) else None

    phases = wait_for(finished, 300, interval=1, what="e2e-rev and e2e-rev2 finished")
    assert phases == {"e2e-rev": "Succeeded", "e2e-rev2": "Succeeded"}, engine.log()[-3000:]
    for name, steps in (("e2e-rev", 4), ("e2e-rev2", 5)):
        st = ftt(info, ns, name)["status"]
        assert st["step"] == steps and st["totalSteps"] == steps and st["progress"] == f"{steps}/{steps}"
        assert st["loss"] is not None and st["loss"] > 0
        assert st.get("completionTime") and st.get("startTime")
        conds = {c["type"]: c for c in st["conditions"]}
        assert conds["Complete"]["status"] == "True" and conds["Complete"]["reason"] == "Succeeded"
        adapter = engine.out_dir / ns / name
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    table = info.kubectl("get", "ftt", "-n", ns).stdout
    print(table)
    assert table.count("Succeeded") >= 2 and "4/4" in table and "5/5" in table


def check_status_port_answers_only_the_operator(ns: str, engine: HostEngine, op) -> None:
    """The pod's own command line carries only the token's digest; /v1/status and /metrics answer
    the operator's token (its polls moved the tasks above) and nothing else, a tenant's serving
    token included; /healthz stays open for the kubelet's probes."""
    from muxtune.operator.keys import GroupKeys

    tenant = GroupKeys(op.signing_key.read_bytes().strip()).serving_token(ns)
    argv = engine.proc.args
    assert "--status-token-sha256" in argv and op.status_auth["Authorization"].split()[1] not in argv
    tried = answered = 0
    for path in ("/v1/status", "/metrics"):
        for hdr in ({}, {"Authorization": f"Bearer {tenant}"}, {"Authorization": "Bearer wrong"}):
            req = urllib.request.Request(f"http://127.0.0.1:{engine.port}{path}", headers=hdr)
            tried += 1
            try:
                urllib.request.urlopen(req, timeout=5).read()
                answered += 1
            except urllib.error.HTTPError as e:
                assert e.code == 401, (path, hdr, e.code)
        req = urllib.request.Request(f"http://127.0.0.1:{engine.port}{path}", headers=op.status_auth)
        assert urllib.request.urlopen(req, timeout=5).status == 200
    assert urllib.request.urlopen(f"http://127.0.0.1:{engine.port}/healthz", timeout=5).status == 200
    print(f"status-port requests without the operator's token tried: {tried}, answered: {answered}")
    assert answered == 0


def check_deleted_task_leaves_the_running_engine(info, ns: str, engine: HostEngine) -> None:
    """The deleted task leaves the group's ConfigMap and the running engine drops it (it never
    finishes); waited for, since short neighbours may finish before the patch lands."""
    wait_for(lambda: "e2e-long" not in (engine.tasks_dir / "tasks.yaml").read_text(), 60,
             what="e2e-long removed from the group's ConfigMap")
    assert "e2e-keep" in (engine.tasks_dir / "tasks.yaml").read_text()
    wait_for(lambda: f"{ns}/e2e-long" not in engine.tasks(), 60, what="the engine dropped e2e-long")
    assert engine.proc.poll() is None, "the engine must keep running: membership changes do not restart it"
    assert not (engine.out_dir / ns / "e2e-long" / "adapter_model.safetensors").exists()
    assert engine.mirror.updates >= 2

    def reasons(name):
        return {e["reason"] for e in kjson(info, "get", "events", "-n", ns,
                                           "--field-selector", f"involvedObject.name={name}")["items"]}

    # a 4-step task may finish between two polls (Placed -> Succeeded); e2e-long was seen Running
    assert {"Placed", "Succeeded"} <= reasons("e2e-rev")
    assert {"Placed", "Running"} <= reasons("e2e-long")


def check_forged_task_file_is_refused(ns: str, engine: HostEngine) -> None:
    """A tenant's edit of the mounted ConfigMap (another namespace's task, unsigned) reaches the
    engine, which refuses it and keeps training what the operator signed."""
    engine.mirror.stop.set()
    engine.mirror.thread.join()
    (engine.tasks_dir / "tasks.yaml").write_text(yaml.safe_dump(task_manifest("intruder", "team-x", steps=3)))
    wait_for(lambda: "task files not applied" in engine.log(), 60, what="the engine refuses the forged tasks file")
    assert "team-x/intruder" not in engine.tasks() and f"{ns}/e2e-keep" in engine.tasks()
    engine.mirror.sync()  # the kubelet delivers the operator's signed file again


def check_dead_engine_then_teardown(info, ns: str, group: str, pod_uid: str, engine: HostEngine, op) -> None:
    # the engine dies: after a few failed polls its tasks say so, and since when
    engine.proc.kill()
    engine.proc.wait()
    wait_for(lambda: {c["type"]: c for c in ftt(info, ns, "e2e-keep")["status"]["conditions"]}
             .get("EngineReachable", {}).get("status") == "False", 60, what="EngineReachable=False")
    assert "has not answered since" in ftt(info, ns, "e2e-keep")["status"]["message"]

    # the last active member leaves: the group is torn down and its GPU released
    info.kubectl("delete", "ftt", "e2e-keep", "-n", ns)

    def torn_down():
        gs = kjson(info, "get", "backbonegroups", "-n", ns)["items"]
        return not [g for g in gs if g["metadata"]["name"] == group]

    wait_for(torn_down, 60, what="group torn down")
    wait_for(lambda: not [p for p in kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={group}")["items"]
                          if p["metadata"]["uid"] == pod_uid and not p["metadata"].get("deletionTimestamp")],
             60, what="pod deleted with the group")
    m = op.metrics()
    assert "muxtune_operator_time_to_running_seconds_count" in m
    count = [ln for ln in m.splitlines() if ln.startswith("muxtune_operator_time_to_running_seconds_count")][0]
    assert float(count.split()[-1]) >= 1


def test_engine_trains_a_group_pod_to_succeeded(operator_env, tmp_path):
    info, ns, op = operator_env["info"], operator_env["b"], operator_env["op"]
    t_start = time.monotonic()
    data = tmp_path / "data"
    (data / ns).mkdir(parents=True)  # the namespace's own area: the pod mounts it at /data/<ns>
    names = apply_four_tasks(info, ns, data / ns)
    group, pod = one_group_and_bound_pod(info, ns, names)
    engine = HostEngine(info, ns, group, tmp_path, auth=op.status_auth)
    try:
        engine.start(pod, data)
        check_running_then_short_tasks_succeed(info, ns, group, engine)
        check_status_port_answers_only_the_operator(ns, engine, op)
        check_deleted_task_leaves_the_running_engine(info, ns, engine)
        check_forged_task_file_is_refused(ns, engine)
        check_dead_engine_then_teardown(info, ns, group, pod["metadata"]["uid"], engine, op)
        print(f"e2e wall time {time.monotonic() - t_start:.1f}s")
    finally:
        engine.stop()
