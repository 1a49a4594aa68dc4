"""IA3: learned rescaling of a layer's output, or of its input for feed-forward layers (Liu et al., 2022)."""
from __future__ import annotations

import torch
from torch import nn

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.peft.base import PeftMethod, TaskDelta, implements, matches_target
from muxtune.facts.methods.ia3 import Ia3Decl


class Ia3Delta(TaskDelta):
    method = Ia3Decl.name

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        dev = base.weight.device
        self.feedforward = feedforward
        # PEFT's shapes: (1, in) for feed-forward layers, (out, 1) otherwise; initialised to ones
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=dev))

    def input_scale(self):
        return self.ia3_l.flatten() if self.feedforward else None

    def output_scale(self):
        return None if self.feedforward else self.ia3_l.flatten()

    def peft_state(self):
        return {"ia3_l": self.ia3_l}

    def feature_axes(self):
        return {"ia3_l": {"in": 1} if self.feedforward else {"out": 0}}


@implements(Ia3Decl)
class Ia3(PeftMethod):
    @staticmethod
    def make_delta(base, module_name, spec: PeftSpec, generator):
        return Ia3Delta(base, feedforward=matches_target(module_name, spec.feedforward_modules))
