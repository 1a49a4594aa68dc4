"""The parallel tier's pure parts: layout checks, layer split, round plans, the 1F1B schedule and
its bubble count, and the launch configuration torchrun's PET_* variables produce."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from muxtune.engine.data.dataset import Example
from muxtune.engine.parallel.dims import LayoutError, ParallelDims
from muxtune.engine.parallel.plan import balance, plan_round, replica_share
from muxtune.engine.parallel.schedule import B, F, bubble_fraction, one_f_one_b, render, simulate, stage_actions
from muxtune.engine.parallel.split import split_layers


def test_dims_product_must_equal_world():
    dims = ParallelDims(dp=2, tp=1, pp=2, world_size=4)
    assert [dims.coords(r) for r in range(4)] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    assert all(dims.rank_of(*dims.coords(r)) == r for r in range(4))
    with pytest.raises(LayoutError, match=r"--dp 2 x --tp 1 x --pp 2 = 4 does not match the 2 rank"):
        ParallelDims(dp=2, tp=1, pp=2, world_size=2)
    with pytest.raises(LayoutError, match="at least 1"):
        ParallelDims(dp=0, world_size=0)


def test_split_balances_compute_and_counts_the_head():
    plans = split_layers(1.0, [10.0] * 4, 0.0, 2)
    assert [(p.start, p.end) for p in plans] == [(0, 2), (2, 4)]
    heavy_head = split_layers(1.0, [10.0] * 4, 25.0, 2)  # the LM head costs 2.5 layers: stage 1 keeps one
    assert [(p.start, p.end) for p in heavy_head] == [(0, 3), (3, 4)]
    assert max(p.cost for p in heavy_head) == 35.0
    with pytest.raises(ValueError, match="only 4 decoder layers"):
        split_layers(1.0, [10.0] * 4, 0.0, 5)


@pytest.mark.parametrize("stages,m", [(2, 1), (2, 4), (4, 3), (4, 8)])
def test_one_f_one_b_runs_every_micro_batch_once_and_bounds_in_flight(stages, m):
    for s in range(stages):
        acts = one_f_one_b(list(range(m)), stages, s)
        assert sorted((a.kind, a.mb) for a in acts) == sorted([(F, i) for i in range(m)] + [(B, i) for i in range(m)])
        in_flight = peak = 0
        for a in acts:
            in_flight += 1 if a.kind == F else -1
            peak = max(peak, in_flight)
        assert peak <= stages - s  # 1F1B keeps at most P - s activations alive
    fractions = bubble_fraction(simulate(stage_actions([list(range(m))], stages)))
    assert fractions == pytest.approx([(stages - 1) / (m + stages - 1)] * stages)


def _picks(n_tasks: int, seqs: int):
    picks = []
    for t in range(n_tasks):
        task = SimpleNamespace(slot=t, key=f"default/t{t}")
        exs = [Example(tuple(range(1, 5 + (7 * t + 3 * i) % 11)), tuple([1] * (4 + (7 * t + 3 * i) % 11)))
               for i in range(seqs)]
        picks.append(SimpleNamespace(task=task, examples=exs))
    return picks


def _plan(picks, **kw):
    args = dict(dp=1, dp_rank=0, pp=2, micro_batches=2, interleave=True, chunk_size=None,
                device=torch.device("cpu"), pad_id=0, attn_ratio=0.0)
    args.update(kw)
    return plan_round(picks, **args)


def test_turning_interleaving_off_raises_the_bubble():
    """Counted in schedule ticks: three tasks' micro-batches in one flush leave each stage fewer
    idle ticks than three flushes of one task each."""
    picks = _picks(3, 4)
    on, off = _plan(picks, interleave=True), _plan(picks, interleave=False)
    assert len(on.flushes) == 1 and len(off.flushes) == 3
    # interleaved: consecutive micro-batches of the flush belong to different tasks
    tasks = [on.microbatches[i].tasks[0] for i in on.flushes[0]]
    assert all(a != b for a, b in zip(tasks, tasks[1:]))
    bubble_on = bubble_fraction(simulate(stage_actions(on.flushes, 2)))
    bubble_off = bubble_fraction(simulate(stage_actions(off.flushes, 2)))
    assert bubble_on == pytest.approx([1 / 7, 1 / 7])  # (P-1)/(M+P-1) with M=6
    assert bubble_off == pytest.approx([3 / 9, 3 / 9])  # each task's flush pays P-1 ticks at both ends
    assert all(a < b for a, b in zip(bubble_on, bubble_off))
    text = render(simulate(stage_actions(on.flushes, 2)), on.labels(), "round 1")
    assert text.splitlines()[0] == "round 1" and "F0:t0" in text and "B5:t2" in text and "stage 1" in text


def test_data_parallel_shares_are_disjoint_balanced_and_deterministic():
    picks = _picks(3, 5)
    shares = [replica_share(picks, 2, r) for r in range(2)]
    got = sorted((t.key, ex.input_ids) for share in shares for t, exs in share for ex in exs)
    assert got == sorted((p.task.key, ex.input_ids) for p in picks for ex in p.examples)
    loads = [sum(len(ex.input_ids) for _, exs in share for ex in exs) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(len(ex.input_ids) for p in picks for ex in p.examples)
    assert replica_share(picks, 2, 1) == shares[1]
    assert balance([5, 5, 5], 2) == [[0, 2], [1]]
    # pp=1: one fused micro-batch of every task's share; pp>1: micro-batches of one task each
    fused = _plan(picks, pp=1, dp=2, dp_rank=0)
    assert len(fused.microbatches) == 1 and len(fused.microbatches[0].tasks) == 3
    staged = _plan(picks, pp=2, dp=2, dp_rank=0)
    assert all(len(mb.tasks) == 1 for mb in staged.microbatches)


def test_launch_config_reads_torchruns_pet_variables(monkeypatch):
    from muxtune.engine.parallel.ranks import launch_config, must_launch

    for v in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = launch_config(2)  # one machine: a private rendezvous on a free port
    assert (cfg.min_nodes, cfg.max_nodes, cfg.nproc_per_node, cfg.rdzv_backend) == (1, 1, 2, "c10d")
    assert cfg.rdzv_endpoint == "localhost:0" and cfg.max_restarts == 0
    for k, v in {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "1",
                 "PET_MASTER_ADDR": "grp-0.grp.ns.svc", "PET_MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    assert must_launch(1, 1, 1)  # a pod of a multi-pod group starts its ranks even at dp*tp*pp == 1
    cfg = launch_config(4)
    assert (cfg.min_nodes, cfg.max_nodes, cfg.nproc_per_node) == (2, 2, 2)
    assert cfg.rdzv_backend == "static" and cfg.rdzv_endpoint == "grp-0.grp.ns.svc:29500"
    assert cfg.rdzv_configs["rank"] == 1
    with pytest.raises(LayoutError, match="2 node.* x 2 process.* = 4 ranks"):
        launch_config(8)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not must_launch(2, 1, 2)  # started by torchrun (or our own launch): join, never relaunch
