"""End to end, two pods: a BackboneGroup the planner spreads over two data-parallel pods (its BaseModel's
figures fit no single GPU; the engine runs the built-in tiny model), bound by the real scheduler to
kwok GPU nodes. Each pod's own command line and environment (PET_* of torchrun, --dp 2, the group's
key Secret, the signed ConfigMap) run on this host as test_operator_e2e.py does, with only what a
host cannot have mapped: pod 0's DNS name to 127.0.0.1 and its ports to free ones. The two processes
form one torch.distributed group (gloo) through the engine's own launcher, train the tasks, rank 0
reports to the operator (through the dev endpoint annotation), status reaches the FineTuneTasks,
and the adapters are written once, by pod 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.cluster import TWO_REPLICAS, apply, basemodel, free_port, kjson, task_manifest, wait_for
from tests.helpers.kubelet import ConfigMapMirror, host_command, pod_env, write_data, write_group_key

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1500)]


def apply_wide_and_narrow(info, ns: str, area: Path, bm: str) -> str:
    """"wide" needs two GPUs' memory for its step (by its BaseModel's figures) and, in the speed band
    (priority >= 100), never takes turns with itself: the group gets dp=2; "narrow" fits next to it.
    Returns their group, once both are in it."""
    tasks = [task_manifest("wide", ns, base=f"model:{bm}", data=write_data(area, "wide.jsonl", 48, 1), steps=4,
                           batch=4, seq=8192, priority=100),
             task_manifest("narrow", ns, base=f"model:{bm}", data=write_data(area, "narrow.jsonl", 48, 2), steps=5,
                           batch=2, seq=64)]
    apply(info, basemodel(bm, ns, TWO_REPLICAS), *tasks)

    def one_group():
        gs = {(kjson(info, "get", "ftt", n, "-n", ns).get("status") or {}).get("group") for n in ("wide", "narrow")}
        return gs.pop() if len(gs) == 1 and None not in gs else None

    return wait_for(one_group, 120, what="both tasks in one group")


def two_bound_pods(info, ns: str, group: str) -> list[dict]:
    g = kjson(info, "get", "backbonegroup", group, "-n", ns)
    assert g["spec"]["parallelism"] == {"dp": 2, "tp": 1, "pp": 1}

    def bound():
        pods = sorted(kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={group}")["items"],
                      key=lambda p: p["metadata"]["name"])
        return pods if len(pods) == 2 and all(p["spec"].get("nodeName") for p in pods) else None

    pods = wait_for(bound, 120, what="two pods bound")
    st = wait_for(lambda: (s := kjson(info, "get", "backbonegroup", group, "-n", ns).get("status") or {})
                  .get("podsReady") == "2/2" and s, 60, what="group status: 2/2 pods ready")
    assert st["layout"] == "dp2 x tp1 x pp1" and st["gpus"] == 2
    return pods


def rank_env(env: dict, rank: int, rdzv: int, key: Path, tmp_path: Path) -> dict:
    """Pod `rank`'s environment on this host: its PET_* (torchrun) with the master mapped to here."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    run_env.update({k: v for k, v in env.items() if k.startswith("PET_")})
    assert env["MUXTUNE_HOME"] == "/tmp/muxtune"  # each pod's own cache (the built-in model is made there)
    run_env.update(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(rdzv), OMP_NUM_THREADS="1",
                   MUXTUNE_HOME=str(tmp_path / f"pod-{rank}-tmp" / "muxtune"),
                   MUXTUNE_GROUP=env["MUXTUNE_GROUP"], MUXTUNE_GROUP_KEY_FILE=str(key),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return run_env


def start_engines(pods, group, ns, tasks_dir, data, key, ports, tmp_path, procs, logs) -> list[Path]:
    """Each pod's engine as a process here (appended to procs/logs as they start); their outputs."""
    rdzv = free_port()
    outs = []
    for rank, pod in enumerate(pods):
        env = pod_env(pod)
        assert env["PET_NODE_RANK"] == str(rank) and env["PET_MASTER_ADDR"] == f"{group}-0.{group}.{ns}.svc"
        out = tmp_path / f"output-{rank}"  # each pod's own /output mount
        out.mkdir()
        outs.append(out)
        logs.append(open(tmp_path / f"engine-{rank}.log", "w"))
        procs.append(subprocess.Popen(host_command(pod, tasks_dir, out, data, ports[rank]), cwd=tmp_path,
                                      env=rank_env(env, rank, rdzv, key, tmp_path), stdout=logs[-1],
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return outs


def check_one_distributed_group_trained(info, ns: str, procs, outs, port0: int, tmp_path: Path, auth: dict) -> None:
    def phases():
        ps = {n: (kjson(info, "get", "ftt", n, "-n", ns).get("status") or {}).get("phase") for n in ("wide", "narrow")}
        if all(v in ("Succeeded", "Failed") for v in ps.values()):
            return ps
        # an engine that exits first ends the wait (wait_for would swallow an assertion)
        return {"exited": [p.returncode for p in procs]} if any(p.poll() is not None for p in procs) else None

    got = wait_for(phases, 600, interval=1, what="both tasks finished")
    assert got == {"wide": "Succeeded", "narrow": "Succeeded"}, \
        (got, (tmp_path / "engine-0.log").read_text()[-3000:], (tmp_path / "engine-1.log").read_text()[-3000:])
    # one torch.distributed group of two ranks, reported by rank 0
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port0}/v1/status", headers=auth), timeout=5) as r:
        report = json.load(r)
    assert report["parallel"]["dp"] == 2 and report["parallel"]["world"] == 2, report.get("parallel")
    for name, steps in (("wide", 4), ("narrow", 5)):
        st = kjson(info, "get", "ftt", name, "-n", ns)["status"]
        assert st["step"] == steps and st["progress"] == f"{steps}/{steps}" and st["loss"] > 0
        assert (outs[0] / ns / name / "adapter_model.safetensors").is_file()
        assert not (outs[1] / ns / name).exists(), "only rank 0 writes"
    assert not list(outs[1].rglob("*.safetensors"))


def stop_engines(procs, logs, tmp_path: Path) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in logs:
        f.close()
    for rank in range(len(logs)):
        print(f"---- engine {rank} log (tail) ----\n" +
              "\n".join((tmp_path / f"engine-{rank}.log").read_text().splitlines()[-20:]))


def test_two_pod_group_trains_as_one_distributed_group(operator_env, tmp_path):
    info, ns = operator_env["info"], operator_env["a"]
    t0 = time.monotonic()
    data = tmp_path / "data"
    (data / ns).mkdir(parents=True)
    bm = f"dp-{ns}"
    group = apply_wide_and_narrow(info, ns, data / ns, bm)
    pods = two_bound_pods(info, ns, group)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    mirror = ConfigMapMirror(info, ns, f"{group}-tasks", tasks_dir, tmp_path)
    key = write_group_key(info, ns, pods, tmp_path / "key")
    ports = [free_port(), free_port()]
    procs, logs = [], []
    try:
        outs = start_engines(pods, group, ns, tasks_dir, data, key, ports, tmp_path, procs, logs)
        info.kubectl("annotate", "pod", f"{group}-0", "-n", ns,
                     f"muxtune.io/engine-endpoint=http://127.0.0.1:{ports[0]}", "--overwrite")
        check_one_distributed_group_trained(info, ns, procs, outs, ports[0], tmp_path, operator_env["op"].status_auth)
        print(f"two-pod e2e wall time {time.monotonic() - t0:.1f}s")
    finally:
        mirror.stop.set()
        stop_engines(procs, logs, tmp_path)
        info.kubectl("delete", "ftt", "wide", "narrow", "-n", ns, "--wait=false", check=False)
        info.kubectl("delete", "basemodel", bm, "--wait=false", check=False)
