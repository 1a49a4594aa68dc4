"""The operator's figures for every family, read from config.json alone (no torch on its side),
checked against the real model: the parameter count equals sum(p.numel()), and the memory model's
per-layer shapes equal the model's own Linears (muxtune/facts/config_figures.py, operator/memory.py)."""
from __future__ import annotations

import pytest
from torch import nn

from muxtune.engine.model.families import FAMILIES, decoder_layers, linearize_conv1d
from muxtune.operator import memory
from muxtune.operator.model_figures import basemodel_figures

from .checkpoints import CONFIGS


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _arch(path):
    arch, why = basemodel_figures({"spec": {"source": {"hostPath": {"path": str(path)}}}})
    assert arch is not None, why
    return arch


def test_every_family_has_a_checkpoint_here():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_parameters_and_layer_shapes_from_config_json_equal_the_model(family_checkpoint, model_type):
    path = family_checkpoint(model_type)
    arch, model = _arch(path), _model(path)
    assert arch.parameters == sum(p.numel() for p in model.parameters())  # exact, each tied tensor once
    assert arch.model_type == model_type and arch.layers == model.config.num_hidden_layers
    linearize_conv1d(model)  # as the engine sees GPT-2's projections (weight [out, in])
    layer = decoder_layers(model)[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    # the engine's pipeline split counts a layer's Linears; the operator's split must count the same
    assert memory.layer_linear_params(arch) == sum(m.weight.numel() for m in linears.values())
    # MoE: every expert and the router, which are no Linears, are weights of the layer too
    others = sum(p.numel() for m in layer.modules() if not isinstance(m, nn.Linear) and "Norm" not in type(m).__name__
                 for p in m.parameters(recurse=False))
    assert memory.layer_params(arch) - memory.layer_linear_params(arch) == others
    family = FAMILIES[model_type]
    for target in family.attention_targets + family.mlp_targets:
        name = next(n for n in linears if n.rsplit(".", 1)[-1] == target)
        m = memory.module_of(target, arch)
        assert (m.d_in, m.d_out) == (linears[name].in_features, linears[name].out_features), target
