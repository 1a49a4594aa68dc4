"""The parts a model family declares (muxtune/facts/families.py holds one entry per family):
which Linears tensor parallelism splits (:class:`Shards`) and how its parameters are laid out
(:class:`Layout`, read by muxtune/facts/config_figures.py to count them from config.json).
Torch-free: the operator imports it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shards:
    """A family's Linear names by role in a decoder block.

    attention_in / mlp_in are column-parallel (each rank a block of outputs: whole heads);
    attention_out / mlp_out row-parallel (the matching block of inputs). ``regions`` names the
    attention and MLP modules holding them, when the engine can split this family."""

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


@dataclass(frozen=True)
class Layout:
    """How a family's parameters sit, beyond what config.json says outright.

    ``style`` "decoder" is the Llama-like block (q/k/v/o, an MLP, ``norms`` RMSNorms); "gpt2",
    "opt" and "gpt_neox" have their own counting (learned positions, LayerNorm biases,
    word-embedding projections). Biases: True/False, or "" to read config.json's ``attention_bias``
    / ``mlp_bias`` (default False)."""

    style: str = "decoder"
    mlp_matrices: int = 3  # gated MLP (gate, up, down); 2: fc1/fc2
    norms: int = 2  # per decoder layer
    qkv_bias: bool | str = ""
    o_bias: bool | str = ""
    qk_norm: str = ""  # "head": q/k RMSNorm over head_dim; "all": over heads x head_dim
    experts: bool = False  # MoE: router + num_experts x gated MLP of moe_intermediate_size
