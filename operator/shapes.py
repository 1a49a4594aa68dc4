"""The shapes of a backbone's layers, per family, from its size figures (spec.architecture or
config.json's, operator/model_figures.py): the widths of its projections, its MLP, MoE experts,
and the Linear weights of one decoder layer. Pure arithmetic for operator/memory.py; no torch.
"""
from __future__ import annotations

from muxtune.api.basemodel import Architecture
from muxtune.facts import shards
from muxtune.facts.families import REGISTRY
from muxtune.facts.layouts import Layout
from muxtune.facts.methods import Linear as Module

DEFAULT_VOCAB = 32000


def heads(arch: Architecture) -> int:
    return arch.num_attention_heads or max(1, arch.hidden_size // 128)


def head_dim(arch: Architecture) -> int:
    return arch.head_dim or arch.hidden_size // heads(arch)


def q_size(arch: Architecture) -> int:
    """Width of the query (and attention output): heads x head_dim, the hidden size unless the
    family sets head_dim apart (Gemma 7B: 16 x 256 over a width of 3072)."""
    return heads(arch) * head_dim(arch) if arch.head_dim else arch.hidden_size


def kv_size(arch: Architecture) -> int:
    """Width of k_proj/v_proj outputs (grouped-query attention shrinks them)."""
    n = heads(arch)
    return q_size(arch) * (arch.num_key_value_heads or n) // n


def layout(arch: Architecture) -> Layout:
    """The family's parameter layout (muxtune/facts/families.py); Llama's for an unknown family."""
    family = REGISTRY.get(arch.model_type or "")
    return family.layout if family is not None and family.layout is not None else Layout()


def moe(arch: Architecture) -> tuple[int, int, int] | None:
    """(experts, experts per token, one expert's width) of a MoE family, else None."""
    if not (layout(arch).experts and arch.num_experts):
        return None
    return arch.num_experts, arch.num_experts_per_tok or 1, arch.moe_intermediate_size or ffn_size(arch)


def _vocab(arch: Architecture) -> int:
    return arch.vocab_size or DEFAULT_VOCAB


def ffn_size(arch: Architecture) -> int:
    """Feed-forward width: the figure when given, else from the parameter count of a gated
    (Llama-style) block: per layer 2h^2 + 2h*kv (attention) + 3*h*ffn; clamped to [h, 8h], 8h/3
    when the count is too small to say."""
    if arch.intermediate_size:
        return arch.intermediate_size
    h, L = arch.hidden_size, arch.layers
    embed = 2 * _vocab(arch) * h if arch.vocab_size else 0
    per_layer = (arch.parameters - embed) / L
    ffn = (per_layer - 2 * h * h - 2 * h * kv_size(arch)) / (3 * h)
    if ffn < h:
        ffn = 8 * h / 3
    return int(min(ffn, 8 * h))


def layer_linear_params(arch: Architecture) -> int:
    """A decoder layer's Linear weights, as engine/parallel/split.py counts them (fused MoE experts
    and routers are no Linears): attention, and the MLP (gated: 3 matrices; fc1/fc2: 2)."""
    h, q = arch.hidden_size, q_size(arch)
    mlp = 0 if moe(arch) else layout(arch).mlp_matrices * h * ffn_size(arch)
    return 2 * h * q + 2 * h * kv_size(arch) + mlp


def layer_params(arch: Architecture) -> int:
    """A decoder layer's Linear weights and MoE experts (every expert's gated MLP and the router)."""
    experts = moe(arch)
    extra = experts[0] * (3 * arch.hidden_size * experts[2] + arch.hidden_size) if experts else 0
    return layer_linear_params(arch) + extra


def module_of(name: str, arch: Architecture) -> Module:
    """The shape of the modules a target name matches (suffix match)."""
    h = arch.hidden_size
    base = name.rsplit(".", 1)[-1]
    if base in shards.FUSED_QKV:
        return Module(base, h, q_size(arch) + 2 * kv_size(arch), True, False)
    if base in shards.FUSED_GATE_UP:
        return Module(base, h, 2 * ffn_size(arch), True, False)
    if base in shards.MLP_IN:
        return Module(base, h, ffn_size(arch), True, False)
    if base in shards.MLP_OUT:
        return Module(base, ffn_size(arch), h, True, True)
    if base in shards.VOCAB_MODULES:
        return Module(base, h, _vocab(arch), False, False)
    if base in shards.KV:
        return Module(base, h, kv_size(arch), True, False)
    if base in shards.ATTENTION_OUT:
        return Module(base, q_size(arch), h, True, True)
    # query projections and anything unknown: h x (heads x head_dim) in every layer
    return Module(base, h, q_size(arch), True, base in shards.ROW_PARALLEL)
