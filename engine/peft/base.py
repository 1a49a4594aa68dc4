"""The unified PEFT representation: a method is a per-task delta attached at a Linear of the backbone.

A delta may rescale the layer's input, rescale its output, or add a term computed from the
task's own tokens. The multiplexed layer combines any mix of methods in one pass, so a new
method (prefix tuning, ...) is its torch-free declaration (muxtune/facts/methods/) and one module
here that implements this interface and registers with ``@implements(decl)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from muxtune.api.finetunetask import PeftSpec
from muxtune.facts.methods import PeftMethodDecl


@dataclass(frozen=True)
class ShardSpec:
    """This rank's part of a tensor-parallel Linear (set by engine/parallel/tensor.py).

    dim "out": column-parallel, the rank holds a contiguous block of the outputs;
    dim "in": row-parallel, a block of the inputs. in_features/out_features are the whole layer's.
    """

    dim: Literal["in", "out"]
    rank: int
    world: int
    in_features: int
    out_features: int

    def part(self) -> tuple[int, int]:
        """(start, length) of this rank's block along the split features."""
        n = self.out_features if self.dim == "out" else self.in_features
        return self.rank * (n // self.world), n // self.world


class TaskDelta(nn.Module):
    """One task's trainable state at one adapted Linear."""

    method: ClassVar[str]
    shard: ShardSpec | None = None  # the layer's tensor-parallel part, when it is sharded

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

    def feature_axes(self) -> dict[str, dict[str, int]]:
        """Per parameter attribute, which axis indexes the layer's input ("in") or output ("out")
        features: tensor parallelism splits that axis with the base weight, the rest stays whole."""
        raise NotImplementedError(f"peft method {self.method!r} declares no layout for tensor parallelism")

    def shard_(self, spec: ShardSpec) -> None:
        """Keep this rank's block of every parameter along the split features. The delta was made
        whole, from the task's generator, so a sharded run starts exactly where one process does."""
        start, length = spec.part()
        with torch.no_grad():
            for name, axes in self.feature_axes().items():
                if spec.dim in axes:
                    whole = getattr(self, name)
                    setattr(self, name, nn.Parameter(whole.narrow(axes[spec.dim], start, length).clone()))
        self.shard = spec

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        """Whole tensors (as PEFT saves them); a sharded delta keeps its block of each."""
        attr = {id(p): n for n, p in self.named_parameters(recurse=False)}
        with torch.no_grad():
            for name, value in self.peft_state().items():
                value.copy_(self.local_block(attr.get(id(value), name), state[name]).to(value.dtype))

    def local_block(self, attr: str, whole: torch.Tensor) -> torch.Tensor:
        """This rank's block of a whole tensor shaped like parameter `attr` (itself in one process)."""
        axis = self.feature_axes().get(attr, {}).get(self.shard.dim) if self.shard is not None else None
        return whole if axis is None else whole.narrow(axis, *self.shard.part())


class PeftMethod:
    """How a method builds its deltas (its declaration, muxtune.facts.methods, says the rest).

    attaches (from the declaration): "linear" (a delta at each targeted Linear, combined by the
    multiplexed layer) or "input" (one delta at the input embeddings that supplies the task's
    virtual tokens: prompt tuning; the backbone embeds them per task)."""

    decl: ClassVar[type[PeftMethodDecl]]
    name: ClassVar[str]
    attaches: ClassVar[str]

    @staticmethod
    def stable_name(module: str, name: str) -> str:
        """A tensor's name in checkpoints and task state: '<module path>.<PEFT tensor name>'."""
        return f"{module}.{name}"

    @staticmethod
    def peft_key(stable: str) -> str:
        """The key PEFT saves a tensor under, from its stable name."""
        return "base_model.model." + stable

    @staticmethod
    def make_delta(base: nn.Linear, module_name: str, spec: PeftSpec, generator: torch.Generator) -> TaskDelta:
        raise NotImplementedError


def matches_target(module_name: str, targets: list[str]) -> bool:
    """PEFT's rule: a target names a module exactly or is a suffix after a dot."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


IMPLEMENTATIONS: dict[str, type[PeftMethod]] = {}


def implements(decl: type[PeftMethodDecl]):
    """Class decorator: register an engine PeftMethod as the torch side of a declared method."""
    def register(cls: type[PeftMethod]) -> type[PeftMethod]:
        cls.decl, cls.name, cls.attaches = decl, decl.name, decl.attaches
        IMPLEMENTATIONS[decl.name] = cls
        return cls
    return register
