"""The unified PEFT representation: a method is a per-task delta attached at a Linear of the backbone.

A delta may rescale the layer's input, rescale its output, or add a term computed from the
task's own tokens. The multiplexed layer combines any mix of methods in one pass, so a new
method (DoRA, prefix tuning, ...) is one new module that implements this interface.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from muxtune.api.finetunetask import PeftSpec


class TaskDelta(nn.Module):
    """One task's trainable state at one adapted Linear."""

    method: ClassVar[str]

    def input_scale(self) -> torch.Tensor | None:
        """[in_features] multiplier on this task's input tokens, or None."""
        return None

    def output_scale(self) -> torch.Tensor | None:
        """[out_features] multiplier on this task's output tokens, or None."""
        return None

    def additive(self, x: torch.Tensor) -> torch.Tensor | None:
        """[n, out_features] term added for this task's n tokens x, or None."""
        return None

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Tensors under the names PEFT saves for this module (without the module prefix)."""
        raise NotImplementedError

    def rng_state(self) -> torch.Tensor | None:
        """The state of any random generator the delta draws from while training (checkpoints
        keep it, so a resumed run draws what the uninterrupted one would have)."""
        return None

    def set_rng_state(self, state: torch.Tensor) -> None:
        pass

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in self.peft_state().items():
                value.copy_(state[name].to(value.dtype))


class PeftMethod:
    """How a method builds its deltas and describes itself to PEFT."""

    name: ClassVar[str]

    @staticmethod
    def make_delta(base: nn.Linear, module_name: str, spec: PeftSpec, generator: torch.Generator) -> TaskDelta:
        raise NotImplementedError

    @staticmethod
    def peft_config(spec: PeftSpec, base_model_path: str):
        """A peft.PeftConfig equal to this spec, for adapter_config.json."""
        raise NotImplementedError
