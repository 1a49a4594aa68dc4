"""QLoRA on the cluster: a BaseModel's spec.quantization reaches the engine pods (--quantize) and the
memory model sizes its decoder Linears at 4 or 8 bits plus their scales (torch-free)."""
from __future__ import annotations

import pytest

from muxtune.api.basemodel import Architecture, BaseModelSpec
from muxtune.operator import memory
from muxtune.operator.world import basemodel_architecture
from muxtune.operator.podspec import _quantize_flag

LLAMA_8B = Architecture(parameters=8_030_261_248, layers=32, hidden_size=4096, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)


def test_the_basemodel_quantization_reaches_the_pod():
    source = {"hostPath": {"path": "/models/m"}}
    q = {"metadata": {"name": "m"}, "spec": {"source": source, "quantization": "nf4"}}
    assert _quantize_flag("model:m", q) == ["--quantize", "nf4"]
    assert _quantize_flag("model:m", {"spec": {"source": source}}) == []
    assert _quantize_flag("builtin:tiny-llama", None) == []


def test_the_planner_sees_the_quantization_with_the_figures():
    spec = {"source": {"builtin": "tiny-llama"}, "quantization": "int8"}
    assert basemodel_architecture({"spec": spec}).quantization == "int8"
    figures = LLAMA_8B.model_dump(by_alias=True)
    assert basemodel_architecture({"spec": {"source": {"hostPath": {"path": "/m"}}, "architecture": figures,
                                            "quantization": "nf4"}}).quantization == "nf4"
    assert basemodel_architecture({"spec": {"source": {"builtin": "tiny-llama"}}}).quantization == "none"
    # one fact: spec.architecture takes spec.quantization's, and may not contradict it
    spec = BaseModelSpec.model_validate({"source": {"builtin": "x"}, "architecture": figures, "quantization": "nf4"})
    assert spec.architecture.quantization == "nf4"
    with pytest.raises(ValueError, match="set quantization only"):
        BaseModelSpec.model_validate({"source": {"builtin": "x"}, "quantization": "nf4",
                                      "architecture": {**figures, "quantization": "int8"}})


def test_memory_model_counts_quantized_weights():
    bf16 = memory.weight_bytes(LLAMA_8B)
    nf4 = memory.weight_bytes(LLAMA_8B.model_copy(update={"quantization": "nf4"}))
    int8 = memory.weight_bytes(LLAMA_8B.model_copy(update={"quantization": "int8"}))
    assert bf16 == LLAMA_8B.parameters * 2
    # decoder Linears (~6.98e9 of the 8.03e9) at 0.516 / 1.001 bytes, embeddings and head at 2
    linear = LLAMA_8B.layers * memory.layer_linear_params(LLAMA_8B)
    other = LLAMA_8B.parameters - linear
    assert nf4 == pytest.approx(linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + other * 2, rel=1e-3)
    assert int8 == pytest.approx(linear * (1 + 4 / 4096) + other * 2, rel=1e-3)
    assert 0.35 < nf4 / bf16 < 0.36 and 0.56 < int8 / bf16 < 0.57  # the 128k vocabulary stays 16-bit
    # and the planner's per-rank view counts the same weights
    (rank,) = memory.rank_memory(LLAMA_8B.model_copy(update={"quantization": "nf4"}), [], memory.Parallelism(), 80 << 30)
    assert rank.weights == nf4


def test_the_planner_never_splits_a_quantized_base():
    from muxtune.operator.planner import candidate_parallelisms

    for q, split in (("none", True), ("nf4", False), ("int8", False)):
        layouts = candidate_parallelisms(LLAMA_8B.model_copy(update={"quantization": q}), 8, 4)
        assert any(p.tp * p.pp > 1 for p in layouts) == split
        assert any(p.dp > 1 for p in layouts)
