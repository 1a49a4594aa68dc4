"""A killed run, rerun with the same command, replays the uninterrupted run exactly on CPU:
the same sequences in the same steps, the same losses to the last bit, bitwise-equal adapters.

Real subprocess runs of `muxtune run`, three tasks of different methods, ranks and batch sizes,
and a token budget below every batch, so steps span several fused forwards and tasks wait with
half-trained steps when the signal lands.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers.data import task_doc, write_jsonl

pytestmark = pytest.mark.slow
STEPS = 12
NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "reverse.jsonl", 48, seed=1, kind="reverse")
    write_jsonl(data / "upper.jsonl", 48, seed=2, kind="upper")
    docs = [
        task_doc("a", data / "reverse.jsonl", r=4, batch=4, steps=STEPS, lr=1e-2, seed=1, checkpointInterval=3),
        task_doc("b", data / "upper.jsonl", r=8, batch=6, steps=STEPS, lr=1e-2, seed=2, checkpointInterval=4,
                 targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        task_doc("c", data / "reverse.jsonl", method="ia3", batch=8, steps=STEPS, lr=3e-2, seed=3,
                 checkpointInterval=5, targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",)),
    ]
    spec = root / "tasks.yaml"
    spec.write_text(yaml.safe_dump_all(docs))
    reference = root / "reference"
    proc = subprocess.run(_cmd(spec, reference), capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr
    return spec, reference


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run: same float reductions


def _cmd(spec: Path, out: Path) -> list[str]:
    from tests.helpers.data import data_root_dir

    return [sys.executable, "-m", "muxtune.cli", "run", str(spec), "--output", str(out), "--no-progress",
            "--token-budget", "96", "--data-root", str(data_root_dir())]


def _metrics(out: Path, name: str) -> list[dict]:
    return [json.loads(ln) for ln in (out / "default" / name / "metrics.jsonl").read_text().splitlines()]


def _interrupt(spec: Path, out: Path, sig: int, at_step: int) -> subprocess.Popen:
    proc = subprocess.Popen(_cmd(spec, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    metrics = out / "default" / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= at_step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    return proc


def _assert_replays_reference(out: Path, reference: Path):
    for name in NAMES:
        ref, got = _metrics(reference, name), _metrics(out, name)
        assert [m["step"] for m in got] == list(range(1, STEPS + 1)), name
        for r, g in zip(ref, got):  # step by step: the same sequences, the same loss bits
            assert (g["step"], g["batch"], g["tokens"]) == (r["step"], r["batch"], r["tokens"]), name
            assert g["loss"] == r["loss"] and g["grad_norm"] == r["grad_norm"], (name, g["step"])
        a = load_file(reference / "default" / name / "adapter_model.safetensors")
        b = load_file(out / "default" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), f"{name} {k}: max abs diff {(a[k] - b[k]).abs().max().item()}"


def test_sigterm_then_rerun_replays_exactly(workload, tmp_path):
    """SIGTERM lands while tasks hold half-trained steps; the exit checkpoint must keep them."""
    spec, reference = workload
    out = tmp_path / "out"
    proc = _interrupt(spec, out, signal.SIGTERM, at_step=4)
    assert proc.returncode == 128 + signal.SIGTERM
    rerun = subprocess.run(_cmd(spec, out), capture_output=True, text=True, timeout=600, env=_env())
    assert rerun.returncode == 0, rerun.stderr
    _assert_replays_reference(out, reference)


def test_sigkill_then_rerun_replays_exactly(workload, tmp_path):
    """SIGKILL leaves only the periodic checkpoints; the rerun replays from the newest common cut."""
    spec, reference = workload
    out = tmp_path / "out"
    proc = _interrupt(spec, out, signal.SIGKILL, at_step=7)
    assert proc.returncode == -signal.SIGKILL
    rerun = subprocess.run(_cmd(spec, out), capture_output=True, text=True, timeout=600, env=_env())
    assert rerun.returncode == 0, rerun.stderr
    _assert_replays_reference(out, reference)
