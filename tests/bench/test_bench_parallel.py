"""bench.parallel runs end to end in a tiny configuration: one row per layout and N, sane figures,
and the schedule's bubble (in ticks, independent of timing) higher without interleaving."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO


@pytest.mark.slow
def test_parallel_bench_smoke(tmp_path, muxtune_home):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "bench.parallel", "--quick", "--device", "cpu", "--n", "1", "3", "--steps", "1",
           "--warmup-steps", "0", "--batch-size", "4", "--max-seq-len", "48", "--median-len", "16", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, MUXTUNE_HOME=str(muxtune_home), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens/s" in proc.stdout and "dp2 pp1" in proc.stdout and "pp2 flush" in proc.stdout
    rows = json.loads(out.read_text())
    layouts = sorted((r["n_tasks"], r["dp"], r["pp"], r["interleave"]) for r in rows)
    assert layouts == sorted((n, dp, pp, inter) for n in (1, 3)
                             for dp, pp, inter in ((1, 1, True), (1, 2, True), (1, 2, False), (2, 1, True)))
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["real_tokens"] > 0 and 0 <= r["bubble_measured"] < 1
        assert r["speedup_vs_pp1"] > 0
        assert (r["dp_efficiency"] is not None) == (r["dp"] == 2)
    by = {(r["n_tasks"], r["pp"], r["interleave"]): r for r in rows if r["dp"] == 1}
    assert by[(1, 1, True)]["bubble_ticks"] == 0
    # one task: interleaving has nothing to interleave; three: it fills the flush's bubbles
    assert by[(1, 2, True)]["bubble_ticks"] == pytest.approx(by[(1, 2, False)]["bubble_ticks"])
    assert by[(3, 2, True)]["bubble_ticks"] < by[(3, 2, False)]["bubble_ticks"]
