"""Priority preemption through a real engine: a lower-priority task holding a GPU is taken out of
its group for a priority-1000 task, its engine (the group pod's own command line, run on this
host by muxtune.devcluster.hostengines, which SIGTERMs it when the pod goes, as a kubelet would)
checkpoints it at the cut (the --watch removal; SIGTERM where its pod goes), and once the GPU is
free again it resumes from that checkpoint (here the urgent task took its place in the same
one-task group, so the victim rejoins that engine when the urgent one is done): every step 1..N
trained exactly once, the same sequences in the same order as an uninterrupted run of the same
task, and the same adapter. Small: the built-in tiny model on CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from muxtune.devcluster.hostengines import HostEngines
from tests.helpers.cluster import apply, kjson, task_manifest, wait_for
from tests.helpers.kubelet import write_data

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]
OPERATOR_ARGS = ["--max-tasks-per-group", "1"]  # one task per group: each task holds a GPU
STEPS = 240


def status(info, ns, name) -> dict:
    return kjson(info, "get", "ftt", name, "-n", ns).get("status") or {}


def steps_of(task_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (task_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


class Kubelet:
    """hostengines' kubelet for one namespace, stepped by a thread until stopped."""

    def __init__(self, info, ns: str, tmp: Path):
        self.engines = HostEngines(info.kubectl, tmp / "data", tmp / "output", tmp / "work", namespace=ns)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            try:
                self.engines.step()
            except Exception as e:  # noqa: BLE001 - a failed kubectl call: try again next round
                print(f"host engines: {e}")
            self.stop.wait(0.5)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=30)
        self.engines.close()


def test_a_preempted_task_resumes_from_its_cut_with_no_step_lost(operator_env, tmp_path):
    info, a, b = operator_env["info"], operator_env["a"], operator_env["b"]
    (tmp_path / "data" / a).mkdir(parents=True)
    victim = task_manifest("victim", a, data=write_data(tmp_path / "data" / a, "v.jsonl", 64, 7), steps=STEPS)
    urgent = task_manifest("urgent", a, data=write_data(tmp_path / "data" / a, "u.jsonl", 16, 8), steps=3, priority=1000)
    kubelet = Kubelet(info, a, tmp_path)
    kubelet.thread.start()
    try:
        # every GPU but one taken first by team-b's priority-50 tasks (kwok pods: no engine runs for them)
        gpus = len(info.gpu_nodes) * 8
        apply(info, *[task_manifest(f"fill-{i}", b, steps=100000, priority=50) for i in range(gpus - 1)])
        wait_for(lambda: sum(bool(t.get("status", {}).get("group")) for t in kjson(info, "get", "ftt", "-n", b)["items"])
                 == gpus - 1, 120, what="every GPU but one held")
        apply(info, victim)  # the last GPU
        metrics = tmp_path / "output" / a / "victim" / "metrics.jsonl"
        # its steps as the engine writes them (status trails the engine by a poll)
        wait_for(lambda: metrics.exists() and len(steps_of(metrics.parent)) >= 3, 180, interval=0.2, what="victim training")
        group = wait_for(lambda: status(info, a, "victim").get("group"), 30, what="the victim's group")
        args = kjson(info, "get", "pods", "-n", a, "-l", f"muxtune.io/group={group}")["items"][0]["spec"]["containers"][0]["args"]

        def preempted():
            st = status(info, a, "victim")
            placed = {c["type"]: c for c in st.get("conditions") or []}.get("Placed") or {}
            return st if st.get("phase") == "Pending" and placed.get("reason") in ("Preempted", "WaitingForGpus") else None

        # The tiny model trains a step in ~10 ms: the engine would finish all its steps before the
        # operator's preemption reaches it. Held (SIGSTOP) while the operator decides, it goes on when
        # continued and meets the cut (its task removed, or SIGTERM as its pod goes) where it was.
        engine = next(e for e in list(kubelet.engines.engines.values()) if e.pod.startswith(group))
        os.kill(engine.proc.pid, signal.SIGSTOP)
        try:
            apply(info, urgent)  # the lowest-priority group (the victim's) is preempted for it
            cut = wait_for(preempted, 60, what="the victim preempted")
        finally:
            os.kill(engine.proc.pid, signal.SIGCONT)

        assert cut.get("step", 0) < STEPS
        wait_for(lambda: status(info, a, "urgent").get("phase") == "Succeeded", 240, interval=1, what="urgent trained")
        ckpts = sorted(p.name for p in (tmp_path / "output" / a / "victim" / "checkpoints").iterdir())
        assert ckpts, "no checkpoint at the cut"  # checkpointInterval 0: the cut is the only checkpoint
        # the urgent task's GPU is free again: the victim resumes from its checkpoint
        final = wait_for(lambda: (st := status(info, a, "victim")).get("phase") in ("Succeeded", "Failed") and st,
                         300, interval=1, what="the victim finished after resuming")
        assert final["phase"] == "Succeeded", final
    finally:
        kubelet.close()
        info.kubectl("delete", "ftt", "--all", "-n", a, "--wait=false", check=False)
        info.kubectl("delete", "ftt", "--all", "-n", b, "--wait=false", check=False)
    out = tmp_path / "output" / a / "victim"
    records = steps_of(out)
    cut_step = int(ckpts[0].split("-")[1])
    assert 3 <= cut_step < STEPS, ckpts
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "a step lost or repeated"
    # an uninterrupted run of the same task trains the same sequences at every step, to the same adapter
    ref = tmp_path / "ref"
    spec = {k: v for k, v in victim.items()}
    spec["metadata"] = {"name": "victim", "namespace": a}
    (tmp_path / "victim.yaml").write_text(yaml.safe_dump(spec))
    budget = args[args.index("--token-budget"):][:2] if "--token-budget" in args else []  # as in the pod
    p = subprocess.run([sys.executable, "-m", "muxtune.cli", "run", str(tmp_path / "victim.yaml"), "--output", str(ref),
                        "--data-root", str(tmp_path / "data" / a), "--device", "cpu", "--no-progress", "--no-remote",
                        *budget], timeout=600, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    ref_records = steps_of(ref / a / "victim")
    assert [r["batch"] for r in records] == [r["batch"] for r in ref_records]
    assert (out / "adapter_model.safetensors").read_bytes() == (ref / a / "victim" / "adapter_model.safetensors").read_bytes()
    print(f"preempted at step {cut.get('step')} of {STEPS} (checkpoint {ckpts}), resumed to {STEPS}: {len(records)} steps, "
          "each once; adapter equal to an uninterrupted run's")
