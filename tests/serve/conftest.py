"""Fixtures for serving tests: a serving stack over the tiny built-in backbone, and a client side
that submits straight to the engine (no HTTP) or over loopback HTTP (helpers: tests/helpers/serving.py)."""
from __future__ import annotations

import pytest

from tests.helpers.serving import LoopThread, make_stack, peft_greedy, serve_flags, submit


@pytest.fixture
def tiny_backbone():
    """A fresh fp32 CPU backbone (the precision equality with PEFT is stated in)."""
    import torch

    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import builtin_path, load_backbone

    return MultiplexedBackbone(load_backbone(builtin_path("tiny-llama"), torch.device("cpu"), torch.float32))


@pytest.fixture
def trained_adapters(tmp_path, make_task, data_dir, trainer_factory):
    """Three adapters trained a few steps (so LoRA's B is no longer zero), exported as PEFT directories."""
    tasks = [
        make_task("lora-a", data_dir / "reverse.jsonl", r=4, seed=1, steps=3, lr=3e-2),
        make_task("lora-b", data_dir / "upper.jsonl", r=16, seed=2, steps=3, lr=3e-2,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        make_task("ia3", data_dir / "reverse.jsonl", method="ia3", seed=3, steps=3, lr=0.3,
                  targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",)),
    ]
    trainer = trainer_factory(tmp_path / "trained")
    for t in tasks:
        trainer.add_task(t)
    trainer.run()
    assert all(rt.phase == "Succeeded" for rt in trainer.tasks.values())
    return {t.metadata.name: trainer.tasks[t.key].out_dir for t in tasks}


@pytest.fixture
def stack_factory():
    return make_stack


@pytest.fixture
def submitter():
    return submit


@pytest.fixture
def loop_thread():
    return LoopThread


@pytest.fixture
def peft_reference():
    return peft_greedy


@pytest.fixture
def http_stack(tiny_backbone, trained_adapters, loop_thread):
    """Start a real server (loopback, free port) over the trained adapters; yields a function
    taking the serving flags and returning (base_url, serving); everything stops at teardown."""
    from muxtune.engine.serve.stack import Serving

    started = []

    def start(**flags):
        serving = Serving(tiny_backbone, "base", serve_flags(**flags), host="127.0.0.1", port=0)
        for name, d in trained_adapters.items():
            serving.adapters.add_directory(name, d)
        serving.start()
        lt = loop_thread(serving.loop).__enter__()
        started.append((serving, lt))
        return f"http://127.0.0.1:{serving.http.port}", serving

    yield start
    for serving, lt in started:
        lt.__exit__(None, None, None)
        serving.close()
