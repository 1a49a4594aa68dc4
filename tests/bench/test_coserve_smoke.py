"""bench/coserve.py runs end to end in a tiny configuration: every system at every rate and at the
overload rate, sane rows.

No latency or throughput assertion (a shared 2-core machine); the figures come from
`python -m bench.coserve --quick` and are reported, not asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO


@pytest.mark.slow
def test_coserve_bench_smoke(tmp_path, muxtune_home):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "bench.coserve", "--quick", "--device", "cpu", "--rates", "2", "4", "8",
           "--requests", "3", "--max-tokens", "4", "--warmup-s", "0.5", "--alone-s", "2", "--tasks", "2",
           "--max-seq-len", "32", "--overload-rate", "20", "--overload-s", "1", "--json", str(out), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, MUXTUNE_HOME=str(muxtune_home), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TTFT p50" in proc.stdout and "rate 8.00/s:" in proc.stdout  # the table and the verdicts
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if not r.get("overload")]
    overload = {r["system"]: r for r in data["rows"] if r.get("overload")}
    assert sorted(overload) == ["muxtune", "separate", "temporal"] and "overload: 20.00 requests/s" in proc.stdout
    for r in overload.values():  # 20 arrivals: answered or shed, the server counting what it shed
        assert r["requests"] == 20 and r["ok"] + r["rejected"] <= 20 and r["server_shed"] >= r["shed_429"]
        assert set(r["task_kept"]) <= set(data["alone_task_tokens_per_s"]) and data["alone_task_tokens_per_s"]
    assert sorted((r["system"], r["rate"]) for r in rows) == sorted(
        (s, r) for s in ("muxtune", "temporal", "separate") for r in (2.0, 4.0, 8.0))
    assert data["alone_tokens_per_s"] > 0
    for r in rows:
        assert r["requests"] == 3 and r["ok"] + r["rejected"] <= 3
        assert 0.0 <= r["slo_attainment"] <= 1.0 and r["train_tokens_per_s"] >= 0 and r["peak_host_bytes"] > 0
        for res in r["results"]:
            if res["status"] == 200 and res["error"] is None:
                assert res["tokens"] == 4 and res["ttft"] > 0 and res["tpot"] > 0
    mem = {r["system"]: r["peak_host_bytes"] for r in rows}
    assert mem["separate"] > mem["muxtune"], "two processes with a backbone each hold more than one"
