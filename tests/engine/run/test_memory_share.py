"""A GPU shared by two groups' engines (MuxServe-style; --gpu-memory-fraction): each engine accounts
what it holds against its share. On CPU, through that accounting (weights + 4 x adapter bytes,
and the saved-tensor peak of a round): a task whose state would not fit is refused, and a round
past the share lowers the token budget so that the next rounds fit. (On CUDA the allocator is
capped too, torch.cuda.set_per_process_memory_fraction: not reachable here.)"""
from __future__ import annotations

import torch

from muxtune.engine.memory_share import MemoryShare

MiB = 1 << 20
CPU = torch.device("cpu")


def _share(limit_bytes: int) -> MemoryShare:
    return MemoryShare(limit_bytes / (1024 * MiB), CPU, device_memory_mib=1024)


def test_a_task_that_does_not_fit_the_share_is_refused(make_task, data_dir, tmp_path, trainer_factory):
    trainer = trainer_factory(tmp_path / "a")
    first = trainer.add_task(make_task("a", data_dir / "reverse.jsonl", r=4, steps=1))
    need = MemoryShare(1.0, CPU, 1024).resident(trainer.backbone, trainer.active())
    trainer.memory_share = _share(need + 4 * 1024)  # room for a little more, not for a rank-64 adapter
    big = trainer.add_task(make_task("b", data_dir / "upper.jsonl", r=64, steps=1,
                                     targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    assert big.phase == "Failed" and "share of the GPU" in big.message, big.message
    assert first.phase == "Running"
    trainer.memory_share = _share(4 * need)
    assert trainer.add_task(make_task("c", data_dir / "upper.jsonl", r=64, steps=1)).phase == "Running"


def _peak(trainer) -> int:
    share = MemoryShare(1.0, CPU, 1 << 20)
    trainer.memory_share = share
    trainer.run_round()
    return share.resident(trainer.backbone, trainer.active()) + share.last_peak


def test_a_round_past_the_share_lowers_the_budget(make_task, data_dir, tmp_path, trainer_factory):
    tasks = [make_task(n, data_dir / "reverse.jsonl", r=4, batch=8, steps=4, seed=i) for i, n in enumerate("abcd")]
    peaks = {}
    for budget in (4096, 256):  # what a round holds at each budget, measured
        trainer = trainer_factory(tmp_path / f"m{budget}", token_budget=budget)
        for t in tasks:
            trainer.add_task(t)
        peaks[budget] = _peak(trainer)
    assert peaks[256] < peaks[4096]
    trainer = trainer_factory(tmp_path / "s", token_budget=4096)
    for t in tasks:
        trainer.add_task(t)
    trainer.memory_share = share = _share((peaks[256] + peaks[4096]) // 2)
    trainer.run_round()  # the first round passes the share: the budget goes down
    assert trainer.token_budget < 4096
    while trainer.token_budget > 256 and share.last_peak + share.resident(trainer.backbone, trainer.active()) > share.limit:
        trainer.run_round()
    trainer.run_round()
    assert share.resident(trainer.backbone, trainer.active()) + share.last_peak <= share.limit
    assert trainer.token_budget >= max(t.spec.dataset.max_seq_len for t in tasks)


def test_the_flag_reaches_the_trainer(tmp_path):
    from muxtune.engine import run
    from muxtune.engine.parallel.group import LocalGroup
    from muxtune.runconfig import RunConfig

    from tests.helpers.models import new_trainer

    cfg = RunConfig(tasks=[tmp_path / "t.yaml"], gpu_memory_fraction=0.25, device_memory_mib=2048, device="cpu")
    trainer = run._new_trainer(new_trainer(tmp_path / "o").backbone, cfg, tmp_path, LocalGroup(), None, [], CPU)
    assert trainer.memory_share is not None and trainer.memory_share.limit == 512 * MiB
