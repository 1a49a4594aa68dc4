"""IA3: learned rescaling of a layer's output, or of its input for feed-forward layers (Liu et al., 2022)."""
from __future__ import annotations

import torch
from torch import nn

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.peft.base import PeftMethod, TaskDelta


class Ia3Delta(TaskDelta):
    method = "ia3"

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


def _matches(module_name: str, targets: list[str]) -> bool:
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


class Ia3(PeftMethod):
    name = "ia3"

    @staticmethod
    def make_delta(base, module_name, spec: PeftSpec, generator):
        return Ia3Delta(base, feedforward=_matches(module_name, spec.feedforward_modules))

    @staticmethod
    def peft_config(spec: PeftSpec, base_model_path: str):
        from peft import IA3Config

        return IA3Config(
            target_modules=sorted(spec.target_modules),
            feedforward_modules=sorted(spec.feedforward_modules),
            task_type="CAUSAL_LM", base_model_name_or_path=base_model_path,
        )
