"""A quantized frozen backbone (QLoRA) through bitsandbytes, the path PEFT users take.

The same code runs on CUDA and on CPU (bitsandbytes >= 0.46 ships a CPU backend for NF4 and
LLM.int8), so the round trip CI tests on CPU is the one a GPU user gets: transformers'
``BitsAndBytesConfig`` at load, bitsandbytes' Linear4bit / Linear8bitLt as the base op of every
multiplexed Linear, the adapters in the compute dtype on top. The declarations (bits, scales, the
bytes the memory model counts) are torch-free in muxtune/facts/quantization.py.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from muxtune.facts.quantization import NF4, quant_decl, splittable

# LLM.int8's outlier threshold. 0: every column in int8 (vector-wise: one scale per token and per
# weight row), so each token's output depends on that token alone. bitsandbytes' default 6.0 picks
# the outlier columns over the whole batch: in a fused batch, other tasks' tokens would change this
# task's numbers (and a packed batch would differ from each sequence alone, which the fidelity
# probe refuses). Users load the base with the same llm_int8_threshold=0.0.
INT8_THRESHOLD = 0.0
INSTALL_HINT = "pip install 'bitsandbytes>=0.46' (the engine extra installs it)"


class QuantizationUnavailable(RuntimeError):
    """The quantization asked for cannot run here (no bitsandbytes, or a layout it cannot split)."""


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for a declared quantization, as a QLoRA user writes it:
    NF4 with double-quantized scales and the backbone's dtype as compute dtype, or LLM.int8."""
    decl = quant_decl(quantization)
    if decl is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise QuantizationUnavailable(f"quantization {quantization!r} needs bitsandbytes: {INSTALL_HINT} ({exc})") from None
    from transformers import BitsAndBytesConfig

    if decl is NF4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)


def load_kwargs(quantization: str, device: torch.device, dtype: torch.dtype) -> dict:
    """from_pretrained's extra arguments: the quantization config and a device map (a bitsandbytes
    model is quantized as it is placed, and is not moved afterwards)."""
    config = bnb_config(quantization, dtype)
    if config is None:
        return {}
    return {"quantization_config": config, "device_map": {"": device}}


def check_layout(quantization: str, tp: int, pp: int) -> None:
    """Tensor and pipeline parallelism split or move the base weights, which packed 4/8-bit
    storage does not allow here: refused in one line (data parallelism is fine)."""
    if not splittable(quantization) and (tp > 1 or pp > 1):
        raise QuantizationUnavailable(f"a {quantization} backbone cannot be split (--tp {tp} --pp {pp}); "
                                      "use --dp, or more memory per GPU")


def one_weight_format(model: nn.Module) -> None:
    """Keep each 4-bit weight in the format it trains in. On a CPU with AVX512-BF16, bitsandbytes
    repacks a Linear4bit the first time it runs in eval mode without grad (scales rounded to bf16,
    out_features a multiple of 32 or an assertion): the fidelity probe, evaluation and serving would
    then compute another function than the training rounds, and small layers would not run at all."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized(linear: nn.Module) -> bool:
    """A bitsandbytes Linear (4- or 8-bit): its weight is packed storage, its forward dequantizes."""
    if "bitsandbytes" not in sys.modules:
        return False
    from bitsandbytes.nn import Int8Params, Params4bit

    return isinstance(getattr(linear, "weight", None), (Params4bit, Int8Params))


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The Linear's weight as a dense [out, in] tensor of dtype (dequantized when packed): what
    DoRA's weight norm and any reader of the full matrix needs."""
    if not is_quantized(linear):
        return linear.weight.to(dtype)
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import Params4bit

    w = linear.weight
    if isinstance(w, Params4bit):
        return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)
    scale = w.SCB if getattr(w, "SCB", None) is not None else linear.state.SCB
    return (w.data.float() * scale.float().unsqueeze(1) / 127).to(dtype)


def stored_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy as stored, quantization states included
    (what the weights cost in memory: 4-bit packed, 8-bit, or the dtype)."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def _quant_state_bytes(state) -> int:
    total = state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "state2", None) is not None:  # double quantization's second level
        total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total
