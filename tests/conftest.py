"""Shared fixtures. Models are built and saved by the tests themselves (no hub exists here)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# Dataset paths are relative to a data root (the API refuses absolute paths): tests keep their data
# under pytest's base temporary directory and use it as the data root of every trainer they make.
DATA_ROOT: Path | None = None


@pytest.fixture(scope="session", autouse=True)
def data_root(tmp_path_factory) -> Path:
    global DATA_ROOT
    DATA_ROOT = tmp_path_factory.getbasetemp()
    return DATA_ROOT


def data_path(path: Path | str) -> str:
    """A dataset.path for a file under the tests' data root (absolute paths are made relative)."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    rel = os.path.relpath(p, DATA_ROOT)
    assert not rel.startswith(".."), f"test data {p} must live under the data root {DATA_ROOT}"
    return rel


@pytest.fixture(scope="session", autouse=True)
def muxtune_home(tmp_path_factory) -> Path:
    """A private model cache per test session: the built-in model is generated, saved and
    loaded back through from_pretrained, exactly as on a user's first run."""
    home = Path(os.environ.get("MUXTUNE_TEST_HOME") or tmp_path_factory.mktemp("muxtune-home"))
    os.environ["MUXTUNE_HOME"] = str(home)
    return home


def write_jsonl(path: Path, n: int, seed: int = 0, kind: str = "reverse") -> Path:
    """Deterministic prompt/completion data with mixed lengths."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 14)))
            completion = w[::-1] if kind == "reverse" else w.upper()
            f.write(json.dumps({"prompt": f"{kind}: {w}\n", "completion": completion}) + "\n")
    return path


def task_doc(name: str, data: Path, *, method: str = "lora", r: int = 4, steps: int = 6, batch: int = 4,
             lr: float = 5e-3, seed: int = 0, targets=("q_proj", "v_proj"), ff=(), base: str = "builtin:tiny-llama",
             **training) -> dict:
    peft = {"method": method, "targetModules": list(targets)}
    if method == "lora":
        peft.update(r=r, alpha=2 * r, dropout=0.0)
    if ff:
        peft["feedforwardModules"] = list(ff)
    return {
        "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": name},
        "spec": {
            "baseModel": base,
            "dataset": {"path": data_path(data), "maxSeqLen": 48},
            "peft": peft,
            "training": {"maxSteps": steps, "batchSize": batch, "learningRate": lr, "seed": seed,
                         "checkpointInterval": 0, **training},
        },
    }


@pytest.fixture
def make_task():
    from muxtune.api.finetunetask import FineTuneTask

    def make(*args, **kwargs) -> FineTuneTask:
        return FineTuneTask.model_validate(task_doc(*args, **kwargs))

    return make


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "reverse.jsonl", 64, seed=1, kind="reverse")
    write_jsonl(d / "upper.jsonl", 64, seed=2, kind="upper")
    return d


@pytest.fixture(scope="session")
def tiny_backbone_dir(muxtune_home) -> Path:
    from muxtune.engine.model.loading import builtin_path

    return builtin_path("tiny-llama")


def new_trainer(output: Path, *, token_budget: int = 4096, backbone_dir: Path | None = None,
                base_dir: Path | None = None):
    """A fresh backbone + trainer on CPU in fp32 (the precision transparency is stated in),
    reading datasets under the tests' data root."""
    import torch

    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import builtin_path, load_backbone
    from muxtune.engine.trainer import MuxTrainer

    path = backbone_dir or builtin_path("tiny-llama")
    backbone = MultiplexedBackbone(load_backbone(path, torch.device("cpu"), torch.float32))
    return MuxTrainer(backbone, output, token_budget=token_budget, base_dir=base_dir or DATA_ROOT)


@pytest.fixture
def trainer_factory():
    return new_trainer


def save_tiny_checkpoint(kind: str, path):
    """A tiny Llama or Qwen2 (GQA: 4 query heads, 2 key/value heads) saved by save_pretrained, as a
    user's checkpoint directory is, with the built-in byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from muxtune.engine.model.loading import _byte_tokenizer

    torch.manual_seed(3)
    common = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
    model = LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path



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

        def submit(self, req):
            raise Overloaded(429, "busy (the request reached the engine)", 1)

    mws = [tenant_middleware(TenantTokens(tokens_file), "base")] if tokens_file is not None else []
    return TestClient(TestServer(OpenAIApi(Engine(), tokenizer=[0] * 100).app(*mws)))


@pytest.fixture
def tenant_api():
    return tenant_api_client
