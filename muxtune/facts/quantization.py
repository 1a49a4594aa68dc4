"""How a frozen backbone's Linear weights may be stored (QLoRA): declared once, torch-free.

The CLI (`muxtune run --quantize`), the BaseModel API (`spec.quantization`), the engine's loader
(engine/model/quantize.py, bitsandbytes on CUDA and CPU alike) and the operator's memory model all
read these declarations. Only the decoder blocks' Linears are quantized; the embeddings, the LM
head and the norms stay in the compute dtype, as bitsandbytes leaves them for PEFT users.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Quantization = Literal["none", "nf4", "int8"]
QUANTIZATION_NAMES: tuple[str, ...] = ("none", "nf4", "int8")
NO_QUANTIZATION = "none"


@dataclass(frozen=True)
class QuantDecl:
    """One storage format of the frozen Linear weights.

    bits: bits per weight; block: weights sharing one scale (None: one scale per output row);
    scale_bytes: bytes of each scale as stored (double quantization stores NF4's absmax in 8 bits,
    plus one fp32 second-level scale per ``double_block`` first-level scales)."""

    name: str
    bits: int
    block: int | None
    scale_bytes: float
    double_block: int | None = None
    description: str = ""
    probe_slack: float = 1.0  # times the dtype's fidelity-probe tolerance (engine/model/probe.py)

    def bytes_per_weight(self, in_features: int) -> float:
        """Storage per weight of a Linear with ``in_features`` inputs, scales included."""
        per_scale = self.block or in_features
        scale = self.scale_bytes + (4 / self.double_block if self.double_block else 0.0)
        return self.bits / 8 + scale / per_scale


# QLoRA's choice (Dettmers et al., 2023): NF4 in 64-weight blocks, their absmax double-quantized
# to 8 bits in groups of 256 (bnb_4bit_use_double_quant=True)
NF4 = QuantDecl("nf4", 4, 64, 1.0, 256, "4-bit NormalFloat, double-quantized scales (QLoRA)")
# LLM.int8(): int8 rows with one fp32 absmax scale each (outlier features computed in 16 bits)
# probe_slack: each token's activations are rounded to 8 bits (steps of absmax/127), so a 16-bit
# difference between the packed and the model's own attention can flip a step: on small-llama in
# bf16 the probe measured 1.31 for int8 against 0.30 unquantized and 0.33 nf4 (fp32: 2.9e-6)
INT8 = QuantDecl("int8", 8, None, 4.0, None, "8-bit integers with one scale per output row (LLM.int8)",
                 probe_slack=6.0)
QUANTIZATIONS: dict[str, QuantDecl] = {d.name: d for d in (NF4, INT8)}

QUANTIZE_HELP = ("Store the frozen backbone's decoder Linears quantized (QLoRA): nf4 (4-bit NormalFloat) or "
                 "int8 (LLM.int8), through bitsandbytes; adapters train in the compute dtype. none: as loaded")


def splittable(name: str) -> bool:
    """Whether tensor or pipeline parallelism may split a base stored so: packed 4/8-bit weights are
    neither sharded nor moved between stages here (the engine refuses; the planner never asks)."""
    return name == NO_QUANTIZATION


def probe_slack(name: str) -> float:
    decl = quant_decl(name)
    return 1.0 if decl is None else decl.probe_slack


def quant_decl(name: str) -> QuantDecl | None:
    """The declaration of a storage format, None for unquantized weights."""
    if name == NO_QUANTIZATION:
        return None
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise ValueError(f"unknown quantization {name!r}; known: {', '.join(QUANTIZATION_NAMES)}") from None
