"""Architecture figures read from a model's config.json: what the operator's memory model needs,
so that a BaseModel's author types none of them. The parameter count follows the family's declared
layout (muxtune/facts/families.py); a family muxtune does not know is counted from the tensor
shapes in its safetensors headers when the directory is at hand. Pure JSON reading, no
transformers and no torch: the operator and the model-cache Job both import it.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from muxtune.facts.families import REGISTRY
from muxtune.facts.layouts import Layout

# figure -> config.json keys, the first present wins (GPT-2 and OPT name them their own way)
KEYS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads",),
    "intermediate_size": ("intermediate_size", "ffn_dim", "n_inner"),
    "vocab_size": ("vocab_size",),
    "head_dim": ("head_dim",),
    "num_experts": ("num_experts", "num_local_experts"),
    "num_experts_per_tok": ("num_experts_per_tok",),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "sliding_window": ("sliding_window",),
}


def _first(config: dict, keys: tuple[str, ...]):
    for k in keys:
        if isinstance(config.get(k), int) and not isinstance(config.get(k), bool) and config[k] > 0:
            return config[k]
    return None


def config_figures(config: dict) -> dict:
    """The figures config.json gives (Architecture field names; those it lacks are left out),
    the parameter count included when the family's layout is known. Not the dtype: the engine
    picks its own (bfloat16 on GPUs) whatever the checkpoint was saved in."""
    out = {name: v for name, keys in KEYS.items() if (v := _first(config, keys)) is not None}
    if config.get("use_sliding_window") is False:  # Qwen2/3 declare a window they do not use
        out.pop("sliding_window", None)
    if out.get("intermediate_size") is None and config.get("model_type") == "gpt2" and "hidden_size" in out:
        out["intermediate_size"] = 4 * out["hidden_size"]  # n_inner: null means 4 x n_embd
    if isinstance(config.get("model_type"), str):
        out["model_type"] = config["model_type"]
    family = REGISTRY.get(config.get("model_type"))
    if family is not None and family.layout is not None:
        try:
            out["parameters"] = count_parameters(config, family.layout)
        except (KeyError, TypeError):
            pass  # a figure the count needs is missing: the caller names what is
    return out


def read_figures(model_dir: Path) -> dict:
    """config_figures of the directory's config.json ({} when it has none), the parameter count
    taken from the safetensors headers when the family's layout cannot give it."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    out = config_figures(config if isinstance(config, dict) else {})
    if "parameters" not in out and (n := safetensors_parameters(Path(model_dir))):
        out["parameters"] = n
    return out


def safetensors_parameters(model_dir: Path) -> int:
    """Elements of every tensor in the directory's *.safetensors files, from their JSON headers
    (8-byte little-endian length, then the header) without reading the weights; 0 when none."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            return 0
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                total += n
    return total


class _Dims:
    """The sizes a count needs, with each family's defaults for what config.json leaves out."""

    def __init__(self, config: dict):
        self.config = config
        self.h = _first(config, KEYS["hidden_size"])
        self.layers = _first(config, KEYS["layers"])
        self.heads = _first(config, KEYS["num_attention_heads"])
        self.kv = _first(config, KEYS["num_key_value_heads"]) or self.heads
        self.head_dim = _first(config, KEYS["head_dim"]) or self.h // self.heads
        self.ffn = _first(config, KEYS["intermediate_size"]) or 4 * self.h
        self.vocab = config["vocab_size"]
        self.tied = config.get("tie_word_embeddings", True)  # transformers' default for a key left out

    def flag(self, value: bool | str, key: str) -> bool:
        return bool(self.config.get(key, False)) if value == "" else bool(value)


def count_parameters(config: dict, layout: Layout) -> int:
    """The model's parameter count (each tied tensor once), as sum(p.numel()) of the loaded model."""
    d = _Dims(config)
    count = {"decoder": _decoder, "gpt2": _gpt2, "opt": _opt, "gpt_neox": _gpt_neox}[layout.style]
    return count(d, layout)


def _decoder(d: _Dims, layout: Layout) -> int:
    """Llama-like: q/k/v/o (grouped-query k/v, head_dim), RMSNorms, a gated MLP or MoE experts."""
    h, q, kv = d.h, d.heads * d.head_dim, d.kv * d.head_dim
    attention = h * q + 2 * h * kv + q * h
    attention += (q + 2 * kv) * d.flag(layout.qkv_bias, "attention_bias") + h * d.flag(layout.o_bias, "attention_bias")
    attention += {"head": 2 * d.head_dim, "all": q + kv}.get(layout.qk_norm, 0)
    dense = layout.mlp_matrices * h * d.ffn + (2 * d.ffn + h) * d.flag("", "mlp_bias")
    per_layer = [attention + layout.norms * h + dense] * d.layers
    if layout.experts:
        experts = _first(d.config, KEYS["num_experts"])
        width = _first(d.config, KEYS["moe_intermediate_size"]) or d.ffn
        sparse = experts * (3 * h * width + h)  # each expert's gated MLP, and the router's row
        step, dense_only = d.config.get("decoder_sparse_step") or 1, set(d.config.get("mlp_only_layers") or ())
        per_layer = [p - dense + sparse if i not in dense_only and (i + 1) % step == 0 else p
                     for i, p in enumerate(per_layer)]
    return sum(per_layer) + d.vocab * h * (1 if d.tied else 2) + h


def _gpt2(d: _Dims, layout: Layout) -> int:
    """Learned positions, LayerNorms with biases, Conv1D projections with biases, tied head."""
    h, f = d.h, d.ffn
    per_layer = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    positions = d.config.get("n_positions", d.config.get("max_position_embeddings", 1024)) * h
    return d.layers * per_layer + d.vocab * h * (1 if d.tied else 2) + positions + 2 * h


def _opt(d: _Dims, layout: Layout) -> int:
    """Learned positions (offset 2), embeddings of word_embed_proj_dim projected in and out."""
    c, h, f = d.config, d.h, d.ffn
    bias, affine = c.get("enable_bias", True), c.get("layer_norm_elementwise_affine", True)
    norm = 2 * h if affine else 0
    per_layer = 4 * (h * h + h * bias) + (h * f + f * bias) + (f * h + h * bias) + 2 * norm
    words = c.get("word_embed_proj_dim") or h
    projections = 2 * h * words if words != h else 0
    final = norm if c.get("do_layer_norm_before", True) and not c.get("_remove_final_layer_norm", False) else 0
    positions = (c.get("max_position_embeddings", 2048) + 2) * h
    return d.layers * per_layer + d.vocab * words * (1 if d.tied else 2) + positions + projections + final


def _gpt_neox(d: _Dims, layout: Layout) -> int:
    """Fused head-by-head query_key_value, LayerNorms with biases, untied embed_in/embed_out."""
    h, f = d.h, d.ffn
    bias = d.config.get("attention_bias", True)
    per_layer = 2 * 2 * h + (3 * h * h + 3 * h * bias) + (h * h + h * bias) + (h * f + f) + (f * h + h)
    return d.layers * per_layer + d.vocab * h * (1 if d.tied else 2) + 2 * h
