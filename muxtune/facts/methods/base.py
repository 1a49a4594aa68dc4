"""What a PEFT method declares about itself, torch-free: the API, the operator's memory model, the
server and the engine's parallel layouts read these declarations instead of branching on names.

A method's torch implementation (engine/peft/) registers its deltas against the same name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal


@dataclass(frozen=True)
class Linear:
    """One adapted Linear kind: (d_in, d_out) in every layer, or once outside them (vocab modules);
    row_parallel: split along its inputs under tensor parallelism (else along its outputs)."""

    name: str
    d_in: int
    d_out: int
    per_layer: bool
    row_parallel: bool


def and_list(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c': how messages list method and field names."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def split(width: int, tp: int, along_split_axis: bool) -> int:
    """One tp rank's part of a width: a ceil-divided block when it lies along the split features."""
    return math.ceil(width / tp) if along_split_axis else width


class PeftMethodDecl:
    """A method's declaration. Subclass, set the ClassVars, override what differs, and decorate with
    ``register_peft_method``. ``shape`` below is anything with the spec's attributes (a PeftSpec, or
    the operator's TaskShape): r, target_modules, feedforward_modules, num_virtual_tokens."""

    name: ClassVar[str]  # FineTuneTask.spec.peft.method
    title: ClassVar[str]  # for messages: "prompt tuning"
    # "linear": a delta at each targeted Linear; "input": one delta at the input embeddings
    attaches: ClassVar[Literal["linear", "input"]] = "linear"
    # PeftSpec fields (python names): required by this method; set only with it; booleans on only with it
    requires: ClassVar[tuple[str, ...]] = ()
    owns: ClassVar[tuple[str, ...]] = ()
    flags: ClassVar[tuple[str, ...]] = ()
    # peft_type: what adapter_config.json says, when the server loads this method's adapter directories
    # (a method that attaches at the input is served with its virtual tokens: attaches says which)
    peft_type: ClassVar[str | None] = None

    # ----- PEFT ---------------------------------------------------------------------------------
    @staticmethod
    def peft_config(spec, base_model_path: str):
        """A peft.PeftConfig equal to this spec, for adapter_config.json (peft imported lazily)."""
        raise NotImplementedError

    @staticmethod
    def unsupported_peft_features(cfg: dict) -> Iterator[str]:
        """Features of an adapter_config.json of this method that the multiplexed layers lack."""
        return iter(())

    @staticmethod
    def spec_fields(cfg: dict) -> dict[str, Any]:
        """PeftSpec fields (besides method) of an adapter_config.json of this method."""
        raise NotImplementedError

    # ----- the spec -----------------------------------------------------------------------------
    @classmethod
    def virtual_tokens(cls, spec) -> int:
        """Positions prepended to each of the task's sequences."""
        return 0

    # ----- memory (trainable parameters; bytes saved for backward) --------------------------------
    @staticmethod
    def linear_params(shape, m: Linear, tp: int = 1) -> int:
        """Trainable parameters of the delta at one targeted Linear, on one tp rank."""
        return 0

    @staticmethod
    def input_params(shape, hidden_size: int) -> int:
        """Trainable parameters at the input embeddings (first pipeline stage)."""
        return 0

    @staticmethod
    def keeps_input(shape, target: str) -> bool:
        """Whether the delta at ``target`` keeps its Linear's input for backward."""
        return False

    @staticmethod
    def saved_outputs(shape, target: str, m: Linear, dtype_bytes: int, tp: int) -> dict[str, float]:
        """Further bytes per token the delta at ``target`` keeps, by a name unique to it."""
        return {}

    @staticmethod
    def own_saved(shape, m: Linear) -> int:
        """Bytes per token of the task's own, per layer, that the delta at ``m`` keeps."""
        return 0
