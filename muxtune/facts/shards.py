"""Which Linears of a decoder block split along their outputs (column-parallel) or their inputs
(row-parallel) under tensor parallelism: views of the family registry (muxtune/facts/families.py,
where each family declares its :class:`~muxtune.facts.layouts.Shards`).

The engine splits the families whose tp path is tested (engine/parallel/tensor.py, `split_plan`);
the operator's memory model sizes a target by its role in any known family (operator/memory.py
reads the unions below). Torch-free: the operator imports it.
"""
from __future__ import annotations

from muxtune.facts.families import FAMILIES, REGISTRY
from muxtune.facts.layouts import Shards

# The families the engine splits: those whose tp=2 run is tested equal to one process
# (tests/engine/parallel/test_tensor_parallel.py)
TENSOR_PARALLEL = tuple(k for k, f in FAMILIES.items() if "tp" in f.paths)


def split_plan(model_type: str) -> Shards | None:
    """The shard table the engine splits a family by, or None when it does not split it."""
    family = REGISTRY.get(model_type)
    shards = family.shards if family is not None else None
    return shards if shards is not None and shards.regions is not None else None


# Outside the decoder blocks, once per model: replicated under tensor parallelism.
VOCAB_MODULES = ("lm_head", "embed_tokens", "wte")


def _union(role: str) -> tuple[str, ...]:
    """Every known family's names for one role, in first-seen order (a name means one role)."""
    out: dict[str, None] = {}
    for family in REGISTRY.values():
        if family.shards is not None:
            out.update(dict.fromkeys(getattr(family.shards, role)))
    return tuple(out)


ATTENTION_IN = _union("attention_in")
ATTENTION_OUT = _union("attention_out")
MLP_IN = _union("mlp_in")
MLP_OUT = _union("mlp_out")
KV = _union("kv")
COLUMN_PARALLEL = ATTENTION_IN + MLP_IN
# one Linear computing q, k and v together; one computing gate and up together (Phi-3)
FUSED_QKV = tuple(n for f in REGISTRY.values() if f.fused_qkv and f.shards for n in f.shards.attention_in)
FUSED_GATE_UP = tuple(n for f in REGISTRY.values() if f.shards and f.layout and f.layout.mlp_matrices == 3
                      and len(f.shards.mlp_in) == 1 for n in f.shards.mlp_in)
ROW_PARALLEL = ATTENTION_OUT + MLP_OUT
