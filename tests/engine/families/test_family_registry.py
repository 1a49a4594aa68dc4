"""One registry entry per family (muxtune/facts/families.py): what tensor parallelism splits and what
it refuses agree, and a refusal names the family, the path and why."""
from __future__ import annotations

import pytest

from muxtune.facts import shards
from muxtune.facts.families import FAMILIES, REGISTRY, require


def test_the_families_tp_runs_are_those_with_a_split_plan_and_every_other_says_why():
    for model_type, family in FAMILIES.items():
        if "tp" in family.paths:
            assert shards.split_plan(model_type) is not None, model_type
            require(family, "tp")
        else:
            assert family.tp_refusal, f"{model_type}: refused under tp without a reason"
            with pytest.raises(ValueError) as exc:
                require(family, "tp")
            assert str(exc.value).startswith(f"{family.name} ({model_type}) is not supported under tp: {family.tp_refusal}")
    assert set(shards.TENSOR_PARALLEL) == {k for k, f in FAMILIES.items() if "tp" in f.paths}
    assert {"gpt_neox", "qwen3_moe"} <= set(shards.TENSOR_PARALLEL)  # tested in tests/engine/parallel/


def test_phi3_is_refused_under_tp_naming_its_fused_projection():
    with pytest.raises(ValueError, match=r"Phi-3 \(phi3\) is not supported under tp: .*fused qkv_proj"):
        require(FAMILIES["phi3"], "tp")


def test_every_family_the_engine_runs_declares_its_shards_and_layout():
    for model_type, family in FAMILIES.items():
        assert family.shards is not None and family.layout is not None, model_type
        assert family.layers and family.attention_targets, model_type
    assert set(REGISTRY) - set(FAMILIES) == {"phi", "bert", "mixtral"}  # named for the memory model only
