"""Which Linears of a decoder block split along their outputs (column-parallel) or their inputs
(row-parallel) under tensor parallelism, per model family as muxtune knows them.

The engine splits the families that name their parallel regions (engine/parallel/tensor.py: Llama
and Qwen2 today); the operator's memory model sizes any of them (operator/memory.py). Both read
these tables, so a family added here is known to both. Torch-free: the operator imports it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """A model family's Linear names by role in a decoder block.

    attention_in / mlp_in are column-parallel (each rank a block of outputs: whole heads);
    attention_out / mlp_out row-parallel (the matching block of inputs). ``regions`` names the
    attention and MLP modules holding them, when the engine can split this family."""

    name: str
    attention_in: tuple[str, ...]
    attention_out: tuple[str, ...]
    mlp_in: tuple[str, ...]
    mlp_out: tuple[str, ...]
    kv: tuple[str, ...] = ()  # the key/value projections (narrower under grouped-query attention)
    regions: tuple[str, str] | None = None  # (attention module, MLP module)

    @property
    def column(self) -> tuple[str, ...]:
        return self.attention_in + self.mlp_in

    @property
    def row(self) -> tuple[str, ...]:
        return self.attention_out + self.mlp_out

    def region_members(self) -> dict[str, tuple[str, ...]]:
        """{region module name: the Linears it must hold}, for a family the engine splits."""
        if self.regions is None:
            return {}
        attention, mlp = self.regions
        return {attention: self.attention_in + self.attention_out, mlp: self.mlp_in + self.mlp_out}


_LLAMA = dict(attention_in=("q_proj", "k_proj", "v_proj"), attention_out=("o_proj",),
              mlp_in=("gate_proj", "up_proj"), mlp_out=("down_proj",), kv=("k_proj", "v_proj"),
              regions=("self_attn", "mlp"))

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", **_LLAMA),
    Family("qwen2", **_LLAMA),
    Family("phi3", attention_in=("qkv_proj",), attention_out=("o_proj",), mlp_in=("gate_up_proj",),
           mlp_out=("down_proj",)),
    Family("opt", attention_in=("q_proj", "k_proj", "v_proj"), attention_out=("out_proj",), mlp_in=("fc1",),
           mlp_out=("fc2",), kv=("k_proj", "v_proj")),
    Family("phi", attention_in=("q_proj", "k_proj", "v_proj"), attention_out=("dense",), mlp_in=("fc1",),
           mlp_out=("fc2",), kv=("k_proj", "v_proj")),
    # GPT-2 names both output projections c_proj: it is sized as attention's (hidden x hidden)
    Family("gpt2", attention_in=("c_attn",), attention_out=("c_proj",), mlp_in=("c_fc",), mlp_out=()),
    Family("gpt_neox", attention_in=("query_key_value",), attention_out=("dense",), mlp_in=("dense_h_to_4h",),
           mlp_out=("dense_4h_to_h",)),
    Family("bert", attention_in=("query", "key", "value"), attention_out=("dense",), mlp_in=(), mlp_out=(),
           kv=("key", "value")),
    Family("mixtral", attention_in=("q_proj", "k_proj", "v_proj"), attention_out=("o_proj",), mlp_in=("w1", "w3"),
           mlp_out=("w2",), kv=("k_proj", "v_proj")),
)}

# The family the engine's tensor parallelism splits (Llama and Qwen2 share its names).
TENSOR_PARALLEL_FAMILY = FAMILIES["llama"]

# Outside the decoder blocks, once per model: replicated under tensor parallelism.
VOCAB_MODULES = ("lm_head", "embed_tokens", "wte")


def _union(role: str) -> tuple[str, ...]:
    """Every known family's names for one role, in first-seen order (a name means one role)."""
    out: dict[str, None] = {}
    for family in FAMILIES.values():
        out.update(dict.fromkeys(getattr(family, role)))
    return tuple(out)


ATTENTION_IN = _union("attention_in")
ATTENTION_OUT = _union("attention_out")
MLP_IN = _union("mlp_in")
MLP_OUT = _union("mlp_out")
KV = _union("kv")
COLUMN_PARALLEL = ATTENTION_IN + MLP_IN
ROW_PARALLEL = ATTENTION_OUT + MLP_OUT
