"""The memory model's weights for a quantized backbone are what the engine holds: bitsandbytes'
packed 4-bit / 8-bit storage with its scales, the embeddings and LM head in the dtype."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the engine extra installs it)")


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_memory_model_weights_match_the_loaded_backbone(quantization, tiny_backbone_dir):
    from muxtune.engine.model.loading import load_backbone
    from muxtune.engine.model.quantize import stored_bytes
    from muxtune.facts.builtin_models import BUILTIN_ARCHITECTURES
    from muxtune.operator import memory

    model = load_backbone(tiny_backbone_dir, torch.device("cpu"), torch.float32, quantization=quantization).model
    arch = BUILTIN_ARCHITECTURES["tiny-llama"].model_copy(update={"dtype": "float32", "quantization": quantization})
    held, planned = stored_bytes(model), memory.weight_bytes(arch)
    # int8's per-row scales are counted at hidden-size rows (down_proj's are wider): a slight overcount
    assert planned == pytest.approx(held, rel=5e-3) and planned >= held * 0.999
    if quantization != "none":
        dense = BUILTIN_ARCHITECTURES["tiny-llama"].model_copy(update={"dtype": "float32"})
        assert held < memory.weight_bytes(dense) * (0.21 if quantization == "nf4" else 0.33)
