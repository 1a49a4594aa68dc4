"""Which Linears of a decoder block split along their outputs (column-parallel) or their inputs
(row-parallel) under tensor parallelism, per model family as muxtune knows them.

The engine splits the families that name their parallel regions (engine/parallel/tensor.py; see
TENSOR_PARALLEL); the operator's memory model sizes any of them (operator/memory.py). Both read
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

# Families with Llama's projection names and attention modules that view q/k/v by head_dim alone
# (so a rank's block of whole heads runs unchanged). Qwen3-MoE: its attention; the fused experts stay
# replicated (no Linears in the plan).
_LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "granite", "smollm3", "qwen3_moe")
# The families the engine splits: those whose tp=2 run is tested equal to one process
# (tests/engine/test_tensor_parallel.py); engine/model/families.py gives them the "tp" path.
TENSOR_PARALLEL = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "granite", "smollm3")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    *(Family(name, **_LLAMA) for name in _LLAMA_LIKE),
    # OLMo 2 normalises q and k over all heads at once (RMSNorm over heads x head_dim): not split
    Family("olmo2", **{**_LLAMA, "regions": None}),
    Family("phi3", attention_in=("qkv_proj",), attention_out=("o_proj",), mlp_in=("gate_up_proj",),
           mlp_out=("down_proj",)),
    Family("opt", attention_in=("q_proj", "k_proj", "v_proj"), attention_out=("out_proj",), mlp_in=("fc1",),
           mlp_out=("fc2",), kv=("k_proj", "v_proj")),
    Family("phi", attention_in=("q_proj", "k_proj", "v_proj"), attention_out=("dense",), mlp_in=("fc1",),
           mlp_out=("fc2",), kv=("k_proj", "v_proj")),
    # GPT-2 names both output projections c_proj: it is sized as attention's (hidden x hidden)
    Family("gpt2", attention_in=("c_attn",), attention_out=("c_proj",), mlp_in=("c_fc",), mlp_out=()),
    # NeoX's fused query_key_value is laid out head by head ([q k v] per head), so a block of whole
    # heads is a contiguous block of rows: it splits as a column-parallel Linear
    Family("gpt_neox", attention_in=("query_key_value",), attention_out=("dense",), mlp_in=("dense_h_to_4h",),
           mlp_out=("dense_4h_to_h",), regions=("attention", "mlp")),
    Family("bert", attention_in=("query", "key", "value"), attention_out=("dense",), mlp_in=(), mlp_out=(),
           kv=("key", "value")),
    Family("mixtral", attention_in=("q_proj", "k_proj", "v_proj"), attention_out=("o_proj",), mlp_in=("w1", "w3"),
           mlp_out=("w2",), kv=("k_proj", "v_proj")),
)}



def split_plan(model_type: str) -> Family | None:
    """The shard table the engine splits a family by, or None when it does not split it."""
    family = FAMILIES.get(model_type)
    return family if family is not None and family.regions is not None else None

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
