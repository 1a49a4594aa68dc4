"""The benchmark runs end to end in a tiny configuration and writes sane rows.

No wall-clock assertion: this machine is shared and slow; the speed targets are measured by
`python -m bench.multitask --quick` and reported, never asserted.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

SYSTEMS = ("separate", "sequential", "separate-packed", "sequential-packed", "muxtune")
REQUIRED = {
    "system", "n_tasks", "tokens_per_s", "peak_memory_bytes", "speedup_vs_separate", "speedup_vs_sequential",
    "speedup_vs_separate_packed", "speedup_vs_sequential_packed", "memory_vs_separate", "memory_vs_separate_packed",
    "effective_token_ratio", "attention_work_ratio", "task_completion_s", "mfu",
    "real_tokens", "computed_tokens", "task_real_tokens", "task_first_loss",
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory, muxtune_home) -> list[dict]:
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    cmd = [sys.executable, "-m", "bench.multitask", "--quick", "--device", "cpu", "--n", "1", "2",
           "--steps", "2", "--warmup-steps", "1", "--batch-size", "3", "--max-seq-len", "48",
           "--median-len", "16", "--sigma", "0.8", "--ranks", "2", "4", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, MUXTUNE_HOME=str(muxtune_home)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens/s" in proc.stdout and "muxtune" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


@pytest.mark.slow
def test_one_row_per_system_and_n(rows):
    assert sorted((r["system"], r["n_tasks"]) for r in rows) == sorted((s, n) for s in SYSTEMS for n in (1, 2))
    for r in rows:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()


@pytest.mark.slow
def test_values_are_sane(rows):
    for r in rows:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        assert r["peak_memory_bytes"] > 0
        assert 0 < r["effective_token_ratio"] <= 1
        assert r["real_tokens"] <= r["computed_tokens"]
        assert len(r["task_completion_s"]) == r["n_tasks"] and all(t > 0 for t in r["task_completion_s"])
        assert r["mfu"] is None  # CPU: no MFU
        assert r["processes"] == (r["n_tasks"] if r["system"].startswith("separate") else 1)
        assert r["speedup_vs_separate"] == pytest.approx(
            r["tokens_per_s"] / next(o["tokens_per_s"] for o in rows if o["system"] == "separate" and o["n_tasks"] == r["n_tasks"]))
    # the padded HF loop pads to the longest sequence of each batch; lengths vary, so it computes padding,
    # and its attention computes the whole square; the packed ones compute neither
    padded = [r for r in rows if r["system"] in ("separate", "sequential")]
    assert any(r["effective_token_ratio"] < 1 for r in padded) and all(r["attention_work_ratio"] < 0.6 for r in padded)
    for r in rows:
        if r["system"].endswith("-packed"):
            assert r["effective_token_ratio"] == 1.0 and r["attention_work_ratio"] == 1.0
        if r["system"] == "muxtune":
            assert r["attention_work_ratio"] > 0.95


@pytest.mark.slow
def test_every_system_trains_the_same_tokens(rows):
    for n in (1, 2):
        group = {r["system"]: r for r in rows if r["n_tasks"] == n}
        assert len({r["real_tokens"] for r in group.values()}) == 1
        assert len({tuple(r["task_real_tokens"]) for r in group.values()}) == 1
        # LoRA B starts at zero: step 1's loss is the frozen model's on the same batch, in every system
        ref = group["separate"]["task_first_loss"]
        for r in group.values():
            assert r["task_first_loss"] == pytest.approx(ref, rel=1e-3)


@pytest.mark.slow
def test_exec_launcher(tmp_path, muxtune_home):
    """The launcher the GPU mode uses: every worker a fresh interpreter."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "bench.multitask", "--quick", "--device", "cpu", "--launcher", "exec", "--n", "2",
           "--systems", "separate", "muxtune", "--steps", "1", "--warmup-steps", "0", "--repeats", "1",
           "--batch-size", "2", "--max-seq-len", "32", "--median-len", "12", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, MUXTUNE_HOME=str(muxtune_home)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["system"], r["launcher"], r["processes"]) for r in rows] == [("separate", "exec", 2), ("muxtune", "exec", 1)]
    assert rows[0]["task_real_tokens"] == rows[1]["task_real_tokens"]
    assert rows[1]["speedup_vs_sequential"] is None  # sequential not run: no ratio, no crash
