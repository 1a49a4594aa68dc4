"""The serving side of the tests: a serving stack over a backbone (no HTTP), requests submitted
straight to the engine, the hybrid loop on a thread, and what PEFT itself generates."""
from __future__ import annotations

import threading
from types import SimpleNamespace


def serve_flags(**overrides):
    """The CLI's serving flags with their defaults (muxtune.runconfig.ServeFlags), overridden."""
    from muxtune.runconfig import ServeFlags

    return ServeFlags(**overrides)


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


def tenant_api_client(models: list[str], tokens_file=None):
    """The real OpenAI API handlers (with engine/serve/tenant_auth.py's middleware when a token file
    is given) over a stub engine that lists ``models`` (no backbone: the auth layer decides before
    generation). A request that gets past the auth layer reaches the stub's submit, which answers
    429: a 429 proves the request was let through, a 404/401 that it was not."""
    from aiohttp.test_utils import TestClient, TestServer

    from muxtune.engine.serve.adapters import ServedModel
    from muxtune.engine.serve.engine import Overloaded, ServeLimits
    from muxtune.engine.serve.http_api import OpenAIApi
    from muxtune.engine.serve.tenant_auth import TenantTokens, tenant_middleware

    class Registry:
        base_id = "base"
        base = ServedModel(name="base", root="/models/base")

        def models(self):
            return [ServedModel(name=n, root=f"task:{n}", task_key=n, phase="Running") for n in models]

        def lookup(self, name):
            return self.base if name == "base" else next((m for m in self.models() if m.name == name), None)

    class Engine:
        registry, max_model_len, limits = Registry(), 64, ServeLimits(max_model_len=64, max_tokens=8)

        def submit_all(self, reqs):  # a request's choices, queued together
            raise Overloaded(429, "busy (the request reached the engine)", 1)

    mws = [tenant_middleware(TenantTokens(tokens_file), "base")] if tokens_file is not None else []
    return TestClient(TestServer(OpenAIApi(Engine(), tokenizer=[0] * 100).app(*mws)))
