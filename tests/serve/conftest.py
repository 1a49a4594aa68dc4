"""Fixtures for serving tests: a serving stack over the tiny built-in backbone, and a client side
that submits straight to the engine (no HTTP) or over loopback HTTP."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest


def serve_flags(**overrides):
    """The CLI's serving flags with their defaults (muxtune.cli.ServeFlags), overridden."""
    from muxtune.cli import ServeFlags

    return ServeFlags(**overrides)


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


def make_stack(backbone, trainer=None, adapters=None, *, token_budget=4096, **flags):
    """Engine, controller and hybrid loop (no HTTP); adapters: {name: directory}."""
    from muxtune.engine.serve.adapters import AdapterRegistry
    from muxtune.engine.serve.controller import Slo, SloController
    from muxtune.engine.serve.coserve import CoServer
    from muxtune.engine.serve.engine import ServeEngine
    from muxtune.engine.serve.stack import limits_from
    from muxtune.engine.serve.serving_metrics import ServeMetrics

    cmd = serve_flags(**flags)
    slo = Slo(cmd.slo_tpot_ms / 1000, cmd.slo_ttft_ms / 1000)
    registry = AdapterRegistry(backbone, "base", trainer)
    for name, d in (adapters or {}).items():
        registry.add_directory(name, d)
    metrics = ServeMetrics(slo=slo)
    engine = ServeEngine(backbone, registry, limits_from(cmd), metrics)
    controller = SloController(slo, token_budget)
    loop = CoServer(engine, controller, trainer, metrics, train_floor=cmd.train_floor)
    metrics.attach(engine, controller, trainer, loop)
    registry.sync_tasks()
    return SimpleNamespace(engine=engine, registry=registry, controller=controller, loop=loop, metrics=metrics)


def submit(engine, model: str, prompt, **params):
    """A request straight into the engine; returns it with the list its events land in."""
    from muxtune.engine.serve.chat import encode_prompt
    from muxtune.engine.serve.request import GenerationRequest
    from muxtune.engine.serve.sampling import SamplingParams

    ids = encode_prompt(engine.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    events: list = []
    params.setdefault("temperature", 0.0)
    entry = engine.registry.lookup(model)
    assert entry is not None, f"{model} is not served"
    req = GenerationRequest(model=entry, prompt_ids=ids,
                            params=SamplingParams(**params), sink=events.append)
    engine.submit(req)
    return req, events


class LoopThread:
    """The hybrid loop on a thread of its own (the CLI runs it on the main thread)."""

    def __init__(self, loop):
        self.loop, self.stop = loop, threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.loop.run(self.stop.is_set)
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.error = exc

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.loop.engine.wakeup.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the serving loop did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def stack_factory():
    return make_stack


@pytest.fixture
def submitter():
    return submit


@pytest.fixture
def loop_thread():
    return LoopThread


def peft_greedy(adapter_dir, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool) -> list[int]:
    """What PEFT generates: PeftModel.from_pretrained(...).generate(do_sample=False), EOS included."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from muxtune.engine.model.loading import builtin_path

    base = AutoModelForCausalLM.from_pretrained(builtin_path("tiny-llama"), dtype=torch.float32)
    if ignore_eos:  # generate through EOS as the server's ignore_eos does (not min_new_tokens: that masks EOS)
        base.generation_config.eos_token_id = None
    model = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir is not None else base
    model.eval()
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


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
