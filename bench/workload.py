"""The benchmark workload: models, per-task datasets and the FLOP count, shared by every system.

Everything here is deterministic: the same arguments give the same files, so the three systems
train exactly the same sequences.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# Llama/Qwen-shaped configs with random weights, for the GPU mode (the built-in models are
# too small to load a GPU). Sizes: llama-1b ~1.1 B parameters (TinyLlama's shape),
# qwen2-0.5b ~0.49 B (Qwen2-0.5B's shape, tied embeddings, 152k vocabulary).
BENCH_CONFIGS: dict[str, dict] = {
    "llama-1b": dict(arch="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                     max_position_embeddings=4096, tie_word_embeddings=False),
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=4096, tie_word_embeddings=True),
}
TARGET_MODULES = ["q_proj", "v_proj"]  # PEFT's default for Llama, and the engine's


@dataclass(frozen=True)
class Job:
    """One fine-tuning task of the workload, as every system sees it."""

    index: int
    name: str
    data: str  # JSON-lines file of {"prompt", "completion"}
    rank: int
    alpha: float
    max_seq_len: int
    batch_size: int
    steps: int  # timed optimizer steps
    warmup_steps: int  # untimed steps before them (on a throwaway adapter)
    lr: float
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        return cls(**d)


def lognormal_lengths(rng: random.Random, n: int, median: float, sigma: float, lo: int, cap: int) -> list[int]:
    """Sequence lengths (tokens, <s> and </s> included) with the long tail real instruction data has."""
    return [max(lo, min(cap, round(math.exp(rng.gauss(math.log(median), sigma))))) for _ in range(n)]


def _text(rng: random.Random, n: int) -> str:
    """n ASCII characters of word-like text (one token each under the byte-level tokenizer)."""
    out = []
    while len(out) < n:
        out.extend(rng.choice("etaoinshrdlucmfwypvbgk") for _ in range(rng.randint(2, 9)))
        out.append(" ")
    return "".join(out[:n])


def write_dataset(path: Path, lengths: list[int], seed: int) -> None:
    """One example per length: prompt + completion of exactly length - 2 bytes (plus <s>, </s>).
    The completion is never empty, so every example carries a loss after truncation."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for n in lengths:
            body = n - 2
            prompt_len = min(body - 1, max(1, round(body * rng.uniform(0.2, 0.6))))
            prompt = _text(rng, prompt_len)
            completion = _text(rng, body - prompt_len)
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def make_jobs(root: Path, n_tasks: int, *, ranks: list[int], batch_size: int, steps: int, warmup_steps: int,
              max_seq_len: int, median_len: float, sigma: float, lr: float) -> list[Job]:
    """N tasks with ranks cycling through `ranks` and lognormal lengths capped at max_seq_len.
    Each task's data depends only on its index, so task i is the same job at every N."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(n_tasks):
        examples = batch_size * max(steps, warmup_steps)
        rng = random.Random(1000 + i)
        lengths = lognormal_lengths(rng, examples, median_len, sigma, 8, max_seq_len)
        path = root / f"task-{i}.jsonl"
        write_dataset(path, lengths, seed=2000 + i)
        r = ranks[i % len(ranks)]
        jobs.append(Job(index=i, name=f"task-{i}", data=str(path), rank=r, alpha=2.0 * r,
                        max_seq_len=max_seq_len, batch_size=batch_size, steps=steps,
                        warmup_steps=warmup_steps, lr=lr, seed=i))
    return jobs


def timed_examples(job: Job, steps: int) -> list[int]:
    """Indices of the examples `steps` optimizer steps consume, from the start of the (unshuffled)
    file, wrapping around: the order the engine's DataStream gives with shuffle off."""
    with open(job.data) as f:
        n = sum(1 for line in f if line.strip())
    return [k % n for k in range(steps * job.batch_size)]


# ----- models ----------------------------------------------------------------------------------
def resolve_model(spec: str) -> Path:
    """builtin:NAME (the engine's built-in models), config:NAME (BENCH_CONFIGS, random weights,
    generated once into the muxtune cache), or a local Hugging Face model directory."""
    if spec.startswith("builtin:"):
        from muxtune.engine.model.loading import builtin_path

        return builtin_path(spec.removeprefix("builtin:"))
    if spec.startswith("config:"):
        return _config_model_path(spec.removeprefix("config:"))
    path = Path(spec).expanduser().resolve()
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {spec}: no config.json there (use builtin:NAME, config:NAME or a directory)")
    return path


def _config_model_path(name: str) -> Path:
    if name not in BENCH_CONFIGS:
        raise SystemExit(f"--model config:{name}: unknown; known: {', '.join(sorted(BENCH_CONFIGS))}")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from muxtune.engine.model.loading import builtin_path, generated_model

    def build(directory: Path) -> None:
        cfg = dict(BENCH_CONFIGS[name])
        # the byte-level tokenizer of the built-in models (no hub here); the embedding keeps the
        # config's full vocabulary so parameter count and LM-head cost are those of the real shape
        tokenizer = AutoTokenizer.from_pretrained(builtin_path("tiny-llama"))
        arch = cfg.pop("arch")
        config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        config = config_cls(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, **cfg)
        # on CPU, so the benchmark's parent process never holds a CUDA context
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = model_cls(config).to(torch.bfloat16)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return generated_model(f"bench-{name}", BENCH_CONFIGS[name], build)


def model_dims(model) -> dict:
    """What the FLOP count needs from a loaded (un-adapted) causal LM."""
    from torch import nn

    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"linear_params": int(linear), "layers": int(cfg.num_hidden_layers),
            "attn_dim": int(cfg.num_attention_heads * head_dim)}


def lora_params(model, rank: int) -> int:
    """Trainable parameters of a rank-r LoRA on TARGET_MODULES of this model."""
    from torch import nn

    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGET_MODULES)


def train_flops(lengths: list[int], dims: dict, trainable: int) -> float:
    """Useful training FLOPs for these sequences: a frozen backbone costs ~4 x parameters per token
    (forward 2P, backward input-gradients 2P, no weight gradients; the LM head included,
    embeddings excluded), the adapter 6 x its parameters, and causal attention
    12 x layers x attn_dim per (query, key) pair within a sequence (QK and AV, forward + 2x backward).
    Padding and cross-sequence work are not useful, so they are not counted."""
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    return (4.0 * dims["linear_params"] + 6.0 * trainable) * tokens + 12.0 * dims["layers"] * dims["attn_dim"] * pairs


# Dense bf16 tensor-core peaks (TFLOP/s) by device name; --peak-tflops overrides.
PEAK_TFLOPS = [("H200", 989.5), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.5),
               ("A100", 312.0), ("L40S", 362.0)]


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None
