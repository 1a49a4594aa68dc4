"""bench/profile.py profiles both systems on the same tokens and sorts their CPU time into buckets."""
from __future__ import annotations

from types import SimpleNamespace

from bench import profile
from bench.workload import make_jobs, resolve_model


def test_profile_buckets_the_same_tokens_for_both_systems(tmp_path, muxtune_home):
    args = SimpleNamespace(token_budget=4096, warmup_steps=1, steps=1, top=5)
    jobs = make_jobs(tmp_path / "data", 2, ranks=[4, 8], batch_size=2, steps=1, warmup_steps=1, max_seq_len=32,
                     median_len=12, sigma=0.5, lr=1e-3)
    model = resolve_model("builtin:tiny-llama")
    results = [profile.profile_system(s, jobs, model, args, tmp_path) for s in ("separate-packed", "muxtune")]
    assert results[0]["tokens"] == results[1]["tokens"] > 0
    for r in results:
        assert r["cpu_s"] > 0 and len(r["top"]) == 5
        assert set(r["buckets"]) >= set(profile.BUCKETS)
        assert r["buckets"]["backward (autograd engine, all backward kernels)"]["us_per_token"] > 0
        assert r["buckets"]["forward attention kernels (SDPA)"]["us_per_token"] > 0  # per-sequence attention ran
    assert results[1]["buckets"]["LoRA deltas, forward (cumulative)"]["us_per_token"] > 0
    assert "CPU time per token" in profile.render(results)
