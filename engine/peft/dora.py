"""DoRA (Liu et al., 2024): LoRA whose updated weight is split into a trained magnitude per output
feature and a direction, as PEFT's `use_dora` computes it:

    y = W x + b + (s - 1) * W x' + s * scaling * B A x',  s = m / ||W + scaling * B A||_row

where x' is the adapter's (dropped-out) input and the norm is a constant for the gradient (paper
section 4.3, and PEFT). It is purely an additive term on the task's own tokens, so it joins the
multiplexed layer like any delta; what it needs beyond LoRA is to read the frozen base weight,
which the delta holds by reference (never a parameter of its own, never trained or saved).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.model.quantize import dense_weight
from muxtune.engine.peft.lora import LoraDelta


class DoraDelta(LoraDelta):
    def __init__(self, base: nn.Linear, spec: PeftSpec, generator: torch.Generator):
        super().__init__(base, spec, generator)
        object.__setattr__(self, "_base", base)  # by reference: not a submodule, not in state dicts
        with torch.no_grad():  # B = 0 at the start, so the magnitude starts as the base weight's row norms
            norm = torch.linalg.norm(dense_weight(base, torch.float32), dim=1)
        self.lora_magnitude_vector = nn.Parameter(norm.to(base.weight.device))

    def magnitude_scale(self, dtype: torch.dtype) -> torch.Tensor:
        w = dense_weight(self._base, dtype)  # dequantized when the base is 4/8-bit (QLoRA)
        lora_w = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)).detach()
        norm = torch.linalg.norm(w + self.scaling * lora_w, dim=1).detach()
        return self.lora_magnitude_vector.to(dtype) / norm

    def additive(self, x: torch.Tensor) -> torch.Tensor:
        x = self._dropped(x)
        s = self.magnitude_scale(x.dtype)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        base = F.linear(x, dense_weight(self._base, x.dtype))
        return (s - 1) * base + s * ((x @ a.t()) @ b.t()) * self.scaling

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {**super().peft_state(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def feature_axes(self):
        raise NotImplementedError("peft.useDora is not supported under tensor parallelism (the weight norm "
                                  "needs every input feature of a row)")
