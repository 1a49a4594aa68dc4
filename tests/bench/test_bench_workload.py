"""The benchmark's pure parts: workload generation, FLOP count, ratios, consistency check, table."""
from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest

from bench import multitask, report
from bench.workload import lognormal_lengths, make_jobs, peak_tflops, timed_examples, train_flops


KW = dict(ranks=[4, 8, 16, 32], batch_size=4, steps=3, warmup_steps=1, max_seq_len=128, median_len=32, sigma=0.9, lr=1e-3)


def _lengths(job) -> list[int]:
    # byte-level tokenizer: one token per ASCII character, plus <s> and </s>
    rows = [json.loads(line) for line in open(job.data)]
    return [len(r["prompt"]) + len(r["completion"]) + 2 for r in rows]


def test_workload_is_deterministic_and_task_i_does_not_depend_on_n(tmp_path):
    a = make_jobs(tmp_path / "a", 4, **KW)
    b = make_jobs(tmp_path / "b", 1, **KW)
    assert open(a[0].data).read() == open(b[0].data).read()
    assert open(a[0].data).read() != open(a[1].data).read()
    assert [j.rank for j in a] == [4, 8, 16, 32]
    assert all(j.alpha == 2 * j.rank for j in a)


def test_lengths_have_a_long_tail_within_the_cap(tmp_path):
    import random

    lengths = lognormal_lengths(random.Random(0), 4000, median=64, sigma=0.9, lo=8, cap=256)
    assert min(lengths) >= 8 and max(lengths) == 256
    assert 55 <= statistics.median(lengths) <= 73
    assert statistics.mean(lengths) > statistics.median(lengths)  # right-skewed
    job = make_jobs(tmp_path, 1, **KW)[0]
    got = _lengths(job)
    assert len(got) == KW["batch_size"] * KW["steps"] and all(8 <= n <= KW["max_seq_len"] for n in got)
    rows = [json.loads(line) for line in open(job.data)]
    assert all(r["completion"] for r in rows)  # every example carries a loss


def test_timed_examples_wrap_like_the_engine_stream(tmp_path):
    job = make_jobs(tmp_path, 1, **KW)[0]
    n = KW["batch_size"] * KW["steps"]
    assert timed_examples(job, KW["steps"]) == list(range(n))
    assert timed_examples(job, KW["steps"] + 1)[n:] == list(range(KW["batch_size"]))


def test_train_flops():
    dims = {"linear_params": 1000, "layers": 2, "attn_dim": 8}
    # 4P per token + 6 x adapter per token + 12 * layers * attn_dim per causal pair
    assert train_flops([3], dims, trainable=10) == (4000 + 60) * 3 + 12 * 2 * 8 * 6
    assert train_flops([2, 2], dims, 0) == 4000 * 4 + 12 * 2 * 8 * (3 + 3)


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.5), ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)])
def test_peak_table(name, peak):
    assert peak_tflops(name) == peak


def _row(system, n, tps, mem, tokens=(10, 20), loss=(5.0, 6.0), bg=0.0):
    return {"system": system, "n_tasks": n, "tokens_per_s": tps, "peak_memory_bytes": mem,
            "task_real_tokens": list(tokens), "task_first_loss": list(loss), "effective_token_ratio": 0.5,
            "task_completion_s": [1.0, 2.0], "mfu": None, "background_cores": bg}


def test_ratios_and_consistency():
    rows = [_row("separate", 2, 100.0, 800), _row("sequential", 2, 50.0, 400), _row("separate-packed", 2, 160.0, 640),
            _row("muxtune", 2, 200.0, 200)]
    report.add_ratios(rows)
    mux = rows[3]
    assert mux["speedup_vs_separate"] == 2.0 and mux["speedup_vs_sequential"] == 4.0
    assert mux["speedup_vs_separate_packed"] == 1.25 and mux["memory_vs_separate_packed"] == 0.3125
    assert mux["speedup_vs_sequential_packed"] is None  # not run: no ratio
    assert mux["memory_vs_separate"] == 0.25
    assert report.check_consistency(rows) == []
    rows[3]["task_real_tokens"] = [10, 21]
    rows[1]["task_first_loss"] = [5.0, 7.0]
    problems = report.check_consistency(rows)
    assert any("real tokens" in p for p in problems) and any("first-step loss" in p for p in problems)


def test_table_warns_on_a_busy_machine():
    args = SimpleNamespace(model="builtin:tiny-llama", steps=4, batch_size=8, warmup_steps=1, median_len=64.0,
                           sigma=0.9, max_seq_len=256, ranks=[4, 8], token_budget=4096, chunk_size=None,
                           repeats=3, threads=None)
    setup = {"device": "cpu", "dtype": "float32", "cores": 2, "device_name": "cpu", "peak_tflops": None}
    rows = [_row("separate", 2, 100.0, 2**30), _row("separate-packed", 2, 150.0, 2**30),
            _row("muxtune", 2, 190.0, 2**28, bg=1.2)]
    report.add_ratios(rows)
    text = report.render(rows, args, setup)
    assert "1.90" in text and "1.27" in text and "WARNING" in text and "MFU" not in text
    assert "x sep-p" in text and "x seq-p" not in text  # columns for the baselines that ran
    rows[2]["background_cores"] = 0.0
    assert "WARNING" not in report.render(rows, args, setup)


def test_rounds_keep_the_median_and_every_figure():
    runs = [_row("muxtune", 2, v, 100) for v in (300.0, 100.0, 200.0)] + [_row("separate", 2, 50.0, 100)]
    rows = {r["system"]: r for r in multitask.merge_rounds(runs)}
    assert rows["muxtune"]["tokens_per_s"] == 200.0 and rows["muxtune"]["tokens_per_s_rounds"] == [300.0, 100.0, 200.0]
    assert rows["separate"]["rounds"] == 1


def test_long_mode_profile():
    args = multitask.parse_args(["--quick", "--long", "--device", "cpu"])
    multitask.resolve_setup(args)
    assert (args.median_len, args.max_seq_len) == (512, 2048)
    args = multitask.parse_args(["--quick", "--long", "--device", "cpu", "--max-seq-len", "1024"])
    multitask.resolve_setup(args)
    assert args.max_seq_len == 1024  # the command line wins


def test_memory_guard_predicts_from_smaller_n():
    rows = [{"system": "separate", "n_tasks": 2, "peak_rss_bytes": 4 * 2**30, "processes": 2},
            {"system": "separate-packed", "n_tasks": 2, "peak_rss_bytes": 2 * 2**30, "processes": 2},
            {"system": "muxtune", "n_tasks": 2, "peak_rss_bytes": 1 * 2**30, "processes": 1}]
    assert multitask._predicted_rss(rows, "separate", 8) == 16 * 2**30
    assert multitask._predicted_rss(rows, "separate-packed", 8) == 8 * 2**30
    assert multitask._predicted_rss(rows, "muxtune", 8) == 1 * 2**30
    assert multitask._predicted_rss(rows, "sequential", 8) is None


def test_table_from_a_json_file(tmp_path, capsys):
    rows = [dict(_row("separate-packed", 8, 100.0, 2**30), model="builtin:tiny-llama", device="cpu", dtype="float32",
                 device_name="cpu", cores=2, tokens_per_cpu_s=60.0),
            dict(_row("muxtune", 8, 120.0, 2**28), model="builtin:tiny-llama", device="cpu", dtype="float32",
                 device_name="cpu", cores=2, tokens_per_cpu_s=70.0, attention_work_ratio=0.99)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "1.20" in out and "0.99" in out and "tok/cpu-s" in out
