"""Model families, the engine's side: the torch-free table is muxtune/facts/families.py (shared
with the operator); here is what needs the model object.

The engine never re-implements a family's forward: it calls the CausalLM's own forward (embedding
scales, residual and logit multipliers, softcaps, rotary variants are the family's code), with
per-sequence positions and the packed boundaries (engine/model/stage.py). A family missing from
the table is inferred (its layers found by shape) and, like every family, must pass the fidelity
probe (engine/model/probe.py) before any task trains on it.
"""
from __future__ import annotations

import logging

from torch import nn

from muxtune.facts.families import FAMILIES, PATHS, Family, fan_in_fan_out, require  # noqa: F401 - re-exported

log = logging.getLogger("muxtune.engine")


def family_of(model: nn.Module) -> Family:
    """The model's family: from the table, or inferred (layers found by shape) with a warning."""
    config = model.config
    known = FAMILIES.get(getattr(config, "model_type", ""))
    if known is not None:
        return known
    path = _find_layers(model)
    if path is None:
        raise ValueError(f"model_type {config.model_type!r}: no decoder layer list found (a ModuleList of "
                         f"num_hidden_layers blocks); this architecture is not supported")
    log.warning("model_type %r is not in the engine's table of tested families; its layers are at %s, and "
                "the fidelity probe decides whether it trains", config.model_type, path,
                extra={"model_type": config.model_type})
    return Family(config.model_type, config.model_type, path, (), known=False)


def _find_layers(model: nn.Module) -> str | None:
    n = getattr(model.config, "num_hidden_layers", None)
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and n]
    return found[0] if len(found) == 1 else None


def decoder_layers(model: nn.Module, family: Family | None = None) -> nn.ModuleList:
    return model.get_submodule((family or family_of(model)).layers)


def linearize_conv1d(model: nn.Module) -> set[str]:
    """Replace each transformers Conv1D by an nn.Linear over the same storage (its weight is the
    Conv1D's transposed view, no copy), so every consumer (MultiplexedLinear, the deltas, tensor
    parallelism, the fused LoRA kernel) sees one layout: weight [out, in]. Numerically the same op
    (addmm(b, x, W) either way). Returns the replaced modules' names (exported with fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        linear = nn.Linear(1, 1, bias=False, device="meta")  # a shell: no allocation
        linear.in_features, linear.out_features = conv.weight.shape
        linear.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=False)
        linear.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return set(names)
