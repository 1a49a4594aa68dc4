"""Under overload training keeps its floor share of the time (and every task, a long-sequence one
included, its fair share of that), requests beyond capacity are refused with 429 and a Retry-After
rather than queued without bound, and both show in the metrics. Bounded: a fixed number of hybrid
iterations with the request queue kept full, on the tiny backbone."""
from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.slow


def long_data(path, n=32):
    with open(path, "w") as f:
        for i in range(n):
            w = "".join("abcdefghij"[(i * 7 + j) % 10] for j in range(40))
            f.write(json.dumps({"prompt": f"copy: {w}\n", "completion": w}) + "\n")
    return path


def soak(s, submitter, iterations: int, in_flight: int = 6, model: str = "short"):
    """One tenant's overload: its own adapter's requests (the same namespace as the training tasks, so
    the per-tenant time share of timeshare.py owes no other tenant anything and the floor acts alone)."""
    submitted = 0
    for _ in range(iterations):
        while len(s.engine.running) + len(s.engine.waiting) < in_flight:
            # staggered lengths: requests admitted together must not all finish in one iteration, which
            # would leave the engine idle for a moment and hand training a full round (not overload)
            submitter(s.engine, model, "reverse: abcdefgh\n", max_tokens=56 + 4 * (submitted % 5), ignore_eos=True)
            submitted += 1
        s.loop.iteration()


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_training_keeps_its_floor_and_no_task_starves(tmp_path, make_task, data_dir, trainer_factory, stack_factory,
                                                      submitter, floor):
    trainer = trainer_factory(tmp_path / "out")
    trainer.add_task(make_task("short", data_dir / "reverse.jsonl", steps=1000, batch=4))
    long = make_task("long", long_data(data_dir / "long.jsonl"), steps=1000, batch=4, lr=1e-3)
    long.spec.dataset.max_seq_len = 128  # ~90 tokens a sequence, against ~15 for "short"
    trainer.add_task(long)
    # SLOs no round can meet: without the floor, training would never run while requests wait
    s = stack_factory(trainer.backbone, trainer, slo_tpot_ms=0.01, slo_ttft_ms=0.01, train_floor=floor)
    soak(s, submitter, 80)
    served = {rt.task.metadata.name: rt.served_tokens for rt in trainer.tasks.values()}
    if floor == 0:
        # the SLOs leave training little (0.105 in one run that failed a 0.1 limit): well under what floor 0.3 keeps (>= 0.24)
        assert s.loop.train_share < 0.2 and s.loop.floor_rounds == 0, s.loop.train_share
        return
    assert all(rt.phase == "Running" for rt in trainer.tasks.values())
    assert s.loop.train_share >= 0.8 * floor, s.loop.train_share
    assert s.loop.floor_rounds > 0
    # No task starves: each, the long one included, completes optimizer steps. Not a share of the
    # tokens: a run trains ~4 short and 1-3 long steps (~120 vs ~356 tokens), so one step moves a
    # task's share by a quarter (0.285 against a 0.3 limit on one fresh-clone run).
    assert all(rt.step >= 1 for rt in trainer.tasks.values()), {k: rt.step for k, rt in trainer.tasks.items()}
    body = s.metrics.render()[0].decode()
    assert "muxtune_serve_train_share_ratio" in body and "muxtune_serve_floor_rounds_total" in body
    print(f"floor {floor}: train share {s.loop.train_share:.2f}, tokens per task {served}")


def test_requests_beyond_capacity_get_429_with_retry_after(tiny_backbone, stack_factory, submitter):
    from muxtune.engine.serve.engine import Overloaded

    s = stack_factory(tiny_backbone, max_num_seqs=1, max_queue_wait_s=0.5)
    now = time.monotonic()
    s.engine._finishes.extend(now - 1 + i / 8 for i in range(9))  # a measured rate of 8 requests/s
    for _ in range(4):  # a row and 3 waiting: under half a second of work ahead
        submitter(s.engine, "base", "x", max_tokens=2)
    s.engine._admit()
    submitter(s.engine, "base", "x", max_tokens=2)  # 4 ahead of the next one: half a second
    with pytest.raises(Overloaded) as exc:
        submitter(s.engine, "base", "x", max_tokens=2)
    assert exc.value.status == 429 and exc.value.retry_after >= 1 and s.engine.shed == 1
    assert "muxtune_serve_shed_requests_total 1.0" in s.metrics.render()[0].decode()
