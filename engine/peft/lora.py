"""LoRA: y += (alpha / r) * B A x on the task's own tokens (Hu et al., 2021)."""
from __future__ import annotations

import math

import torch
from torch import nn

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.peft.base import PeftMethod, TaskDelta, implements
from muxtune.facts.methods.lora import LoraDecl


class LoraDelta(TaskDelta):
    method = LoraDecl.name

    def __init__(self, base: nn.Linear, spec: PeftSpec, generator: torch.Generator):
        super().__init__()
        dev = base.weight.device
        # fp32 master weights whatever the backbone dtype, initialised as PEFT does, drawn from
        # the task's CPU generator so the start is the same on any device or GPU split
        a = torch.empty(spec.r, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.r, device=dev))
        self.scaling = spec.alpha / spec.r
        self.dropout = spec.dropout
        self._dropout_seed = int(torch.randint(2**62, (1,), generator=generator))
        self._dropout_gen: torch.Generator | None = None

    def additive(self, x: torch.Tensor) -> torch.Tensor:
        x = self._dropped(x)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return (x @ a.t()) @ b.t() * self.scaling

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's input: dropout while training, drawn from the task's own generator."""
        if self.dropout and self.training:
            if self._dropout_gen is None:  # on the layer's device, seeded by the task
                self._dropout_gen = torch.Generator(device=x.device).manual_seed(self._dropout_seed)
            keep = torch.rand(self._mask_shape(x), generator=self._dropout_gen, device=x.device) >= self.dropout
            if keep.shape != x.shape:  # row-parallel: this rank's inputs of the mask one process draws
                keep = keep.narrow(1, *self.shard.part())
            x = x * keep / (1 - self.dropout)
        return x

    def rng_state(self) -> torch.Tensor | None:
        return None if self._dropout_gen is None else self._dropout_gen.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        gen = torch.Generator(device=self.lora_A.device)
        try:
            gen.set_state(state)
        except RuntimeError:  # saved on another device type, whose stream cannot continue here
            gen.manual_seed(self._dropout_seed)
        self._dropout_gen = gen

    def _mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.shard is not None and self.shard.dim == "in":
            return (*x.shape[:-1], self.shard.in_features)
        return tuple(x.shape)

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def feature_axes(self) -> dict[str, dict[str, int]]:
        return {"lora_A": {"in": 1}, "lora_B": {"out": 0}}


@implements(LoraDecl)
class Lora(PeftMethod):
    @staticmethod
    def make_delta(base, module_name, spec, generator):
        if spec.use_dora:
            from muxtune.engine.peft.dora import DoraDelta

            return DoraDelta(base, spec, generator)
        return LoraDelta(base, spec, generator)
