"""Tiny models on CPU: a fresh trainer over the built-in backbone, and user-style checkpoints."""
from __future__ import annotations

from pathlib import Path

from tests.helpers.data import data_root_dir


def new_trainer(output: Path, *, token_budget: int = 4096, backbone_dir: Path | None = None,
                base_dir: Path | None = None, quantization: str = "none"):
    """A fresh backbone + trainer on CPU in fp32 (the precision transparency is stated in),
    reading datasets under the tests' data root; quantization: nf4 / int8 (QLoRA, bitsandbytes)."""
    import torch

    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import builtin_path, load_backbone
    from muxtune.engine.trainer import MuxTrainer

    path = backbone_dir or builtin_path("tiny-llama")
    backbone = MultiplexedBackbone(load_backbone(path, torch.device("cpu"), torch.float32, quantization=quantization))
    return MuxTrainer(backbone, output, token_budget=token_budget, base_dir=base_dir or data_root_dir())


def examples_loss(model, examples) -> float:
    """Mean label-token loss of a (PEFT) model over examples, each alone: the user's evaluation."""
    import torch

    from muxtune.engine.data.dataset import IGNORE

    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].float()
            t = torch.tensor(ex.targets)
            keep = t != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep], t[keep], reduction="sum"))
            n += int(keep.sum())
    return total / n


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
