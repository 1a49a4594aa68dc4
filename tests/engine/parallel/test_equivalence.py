"""Parallel layouts train exactly what one process trains: three tasks of different ranks and
methods end with adapters within 1e-4 (fp32) of the single-process run, each layout started the
way a user or a pod starts it. Real processes, gloo, tiny-llama."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from muxtune.engine.durable import checkpoint as ckpt
from tests.helpers.parallel_runs import MUXTUNE, adapter, env, make_workdir, max_diff, run, three_task_docs

NAMES = ("lora-r4", "lora-r16", "ia3")
pytestmark = pytest.mark.slow


def _assert_equal(out, reference):
    for name in NAMES:
        got, want = adapter(out, name), adapter(reference, name)
        diff = max_diff(got, want)
        assert diff < 1e-4, (name, diff)
        steps = [json.loads(ln)["step"] for ln in next(out.rglob(f"{name}/metrics.jsonl")).read_text().splitlines()]
        ref_steps = [json.loads(ln)["step"] for ln in next(reference.rglob(f"{name}/metrics.jsonl")).read_text().splitlines()]
        assert steps == ref_steps  # one line per step, written once (by rank 0)


def test_pp2_self_launched_with_schedule(tmp_path, single_process_run):
    """`muxtune run --pp 2` starts two ranks itself; the split and each round's schedule are printed."""
    root = make_workdir(tmp_path, three_task_docs())
    proc = run([*MUXTUNE, "tasks.yaml", "--output", "out", "--no-progress", "--pp", "2", "--print-schedule"], root)
    assert proc.returncode == 0, proc.stderr
    assert "pipeline split over 2 stages: stage 0: embed + layers 0-1" in proc.stderr
    assert "stage 1: layers 2-3 + norm+head+loss" in proc.stderr
    rounds = [ln for ln in proc.stdout.splitlines() if ln.startswith("round ")]
    assert rounds and "interleaved" in rounds[0]
    assert any(ln.startswith("stage 1 ") and "B" in ln for ln in proc.stdout.splitlines())
    assert proc.stdout.count("TASK ") == 1  # one rank speaks for the group
    _assert_equal(root / "out", single_process_run())
    # the checkpoint holds the whole task's state (both stages' deltas and AdamW moments), as one process writes it
    for name in NAMES:
        ours = ckpt.load(sorted((root / "out").rglob(f"{name}/checkpoints/step-*"))[-1])
        ref = ckpt.load(sorted(single_process_run().rglob(f"{name}/checkpoints/step-*"))[-1])
        assert ours.adapter.keys() == ref.adapter.keys() and ours.optimizer.keys() == ref.optimizer.keys()
        for n, moments in ref.optimizer.items():
            assert moments.keys() == ours.optimizer[n].keys()
            assert all((moments[k].float() - ours.optimizer[n][k].float()).abs().max() < 1e-4 for k in moments), n
        assert ours.meta["lr"] == ref.meta["lr"] and ours.meta["lr_schedule"] == ref.meta["lr_schedule"]


def test_dp2_under_torchrun(tmp_path, single_process_run):
    """The torchrun form: torchrun starts the ranks, `muxtune run` joins them (no relaunch)."""
    root = make_workdir(tmp_path, three_task_docs())
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--no-python",
                "muxtune", "run", "tasks.yaml", "--output", "out", "--no-progress", "--dp", "2"], root)
    assert proc.returncode == 0, proc.stderr
    _assert_equal(root / "out", single_process_run())


def test_tp2_self_launched(tmp_path, single_process_run):
    """Tensor parallel (engine/parallel/tensor.py) under the engine: base Linears and deltas sharded
    over two ranks, replicated-delta gradients summed over tp, whole state in the outputs."""
    root = make_workdir(tmp_path, three_task_docs())
    proc = run([*MUXTUNE, "tasks.yaml", "--output", "out", "--no-progress", "--tp", "2"], root)
    assert proc.returncode == 0, proc.stderr
    _assert_equal(root / "out", single_process_run())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dp2_x_pp2_as_two_pods_with_pet_variables(tmp_path, single_process_run):
    """Two 'pods', each `muxtune run` with only the PET_* variables a multi-pod group gets: together
    they form one four-rank group (dp=2 x pp=2) over a shared output volume."""
    root = make_workdir(tmp_path, three_task_docs())
    port = _free_port()
    procs = [subprocess.Popen([*MUXTUNE, "tasks.yaml", "--output", "out", "--no-progress", "--dp", "2", "--pp", "2"],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(PET_NNODES="2", PET_NPROC_PER_NODE="2", PET_NODE_RANK=str(node),
                                      PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port)))
             for node in (0, 1)]
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert "TASK " in outs[0][0] and "TASK " not in outs[1][0]  # global rank 0 lives on node 0
    _assert_equal(root / "out", single_process_run())


def _sigkill_after(cmd: list[str], root, steps: int) -> int:
    """Start the group, SIGKILL the launcher and every rank at once (a lost pod) once task lora-r4
    has logged `steps` steps; returns how many it had logged."""
    proc = subprocess.Popen(cmd, cwd=root, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    metrics = lambda: list((root / "out").rglob("lora-r4/metrics.jsonl"))  # noqa: E731
    while time.time() < deadline and proc.poll() is None:
        found = metrics()
        if found and len(found[0].read_text().splitlines()) >= steps:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return len(metrics()[0].read_text().splitlines())


def test_sigkilled_group_resumes_under_another_layout_and_ends_equal(tmp_path, single_process_run):
    """Every process of a pp=2 run is SIGKILLed mid-way (a lost pod); rerun as tp=2, it resumes from
    the full, layout-free checkpoints (each rank keeping its shard) and ends where an uninterrupted
    single process ends."""
    root = make_workdir(tmp_path, three_task_docs(steps_scale=2, checkpoint_interval=2))
    cmd = [*MUXTUNE, "tasks.yaml", "--output", "out", "--no-progress"]
    done = _sigkill_after(cmd + ["--pp", "2"], root, steps=5)
    assert 5 <= done < 16, done

    rerun = run([*cmd, "--tp", "2"], root)
    assert rerun.returncode == 0, rerun.stderr
    _assert_equal(root / "out", single_process_run(steps_scale=2, checkpoint_interval=2))


def test_sigkilled_dp_run_with_half_trained_steps_resumes_under_pp(tmp_path, single_process_run):
    """A small token budget spreads each step over several rounds, so the cuts hold half-trained
    steps: their gradients, summed over the dp replicas on save, are restored once (stage by
    stage) under pp=2; the run still ends where an uninterrupted single process ends."""
    root = make_workdir(tmp_path, three_task_docs(steps_scale=2, checkpoint_interval=2))
    cmd = [*MUXTUNE, "tasks.yaml", "--output", "out", "--no-progress", "--token-budget", "48"]
    _sigkill_after(cmd + ["--dp", "2"], root, steps=5)
    half = [m for p in (root / "out").rglob("checkpoints/step-*/state.json")
            if (m := json.loads(p.read_text())).get("in_progress")]
    assert half, "no checkpoint caught a half-trained step"

    rerun = run([*cmd, "--pp", "2"], root)
    assert rerun.returncode == 0, rerun.stderr
    _assert_equal(root / "out", single_process_run(steps_scale=2, checkpoint_interval=2))


def test_layout_that_does_not_match_the_world_is_refused(tmp_path):
    root = make_workdir(tmp_path, three_task_docs())
    proc = run([*MUXTUNE, "tasks.yaml", "--output", "out", "--pp", "2", "--dp", "2"], root,
               RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    assert proc.returncode == 2
    assert "--dp 2 x --tp 1 x --pp 2 = 4 does not match the 2 rank(s) of this group (WORLD_SIZE)" in proc.stderr
    assert not (root / "out").exists()
