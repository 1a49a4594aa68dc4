"""Model families: the few facts about each architecture that the engine cannot read off the
model's own forward, in one place (keyed by `config.model_type`, as vLLM's model registry and
torchtitan's models/ are).

The engine never re-implements a family's forward: it calls the CausalLM's own forward (embedding
scales, residual and logit multipliers, softcaps, rotary variants are the family's code), with
per-sequence positions and the packed boundaries (engine/model/stage.py). What it needs to know
besides is where the decoder layers live (pipeline stages split and skip them), which projections
are GPT-2-style Conv1D (weight stored [in, out], adapted as PEFT does with fan_in_fan_out), which
modules hold fused MoE experts (not adaptable yet), and the attention targets the family's
projections are called by. split.py, the backbone, tensor parallelism and the operator's memory
model ask here; a family missing from the table is inferred (its layers found by shape) and, like
every family, must pass the fidelity probe (engine/model/probe.py) before any task trains on it.

Paths (`PATHS`): what a family is tested through in tests/engine/families/ (the README's table is
checked against this by a test). A path not listed for a family fails that family's tasks naming
both, where the engine can tell (see `require`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

log = logging.getLogger("muxtune.engine")

# every path a task can take; each family lists those it is tested through (tp: the tensor-parallel
# shard plan of engine/parallel/tensor.py, so far tested on Llama and Qwen2 only)
PATHS = ("train", "dp", "pp", "eval", "export", "tp")
_UNTESTED_TP = tuple(p for p in PATHS if p != "tp")


@dataclass(frozen=True)
class Family:
    model_type: str
    name: str  # as users know it, for messages and the README
    layers: str  # dotted path of the decoder layers' ModuleList from the CausalLM
    attention_targets: tuple[str, ...]  # attention projections (PEFT target names)
    mlp_targets: tuple[str, ...] = ()
    conv1d: bool = False  # projections are transformers' Conv1D (weight [in, out]): PEFT's fan_in_fan_out
    fused_qkv: bool = False  # one projection computes q, k and v (tensor parallelism must split it by head)
    experts: tuple[str, ...] = ()  # module names of fused MoE experts (3D weights, not Linears)
    paths: tuple[str, ...] = _UNTESTED_TP
    notes: str = ""
    known: bool = True  # False: inferred for a model_type missing from the table

    def unsupported_targets(self, targets: list[str]) -> str | None:
        """Why these PEFT targets cannot be adapted on this family, or None."""
        hit = sorted(t for t in targets if any(t == e or t.endswith("." + e) or e.endswith("." + t) for e in self.experts))
        if hit:
            return (f"peft.targetModules {hit}: the {self.name} experts are fused 3D parameters, not Linear layers; "
                    f"adapting MoE experts is not supported (target the attention: {', '.join(self.attention_targets)})")
        return None


_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


def _llama_like(model_type: str, name: str, notes: str = "", **kw) -> Family:
    kw.setdefault("mlp_targets", _LLAMA_MLP)
    return Family(model_type, name, "model.layers", _LLAMA_ATTN, notes=notes, **kw)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _llama_like("llama", "Llama", "3.x rope scaling", paths=PATHS),
    _llama_like("qwen2", "Qwen2/2.5", "optional sliding window layers", paths=PATHS),
    _llama_like("qwen3", "Qwen3", "q/k norms"),
    _llama_like("mistral", "Mistral", "sliding window"),
    _llama_like("gemma", "Gemma", "embedding scale"),
    _llama_like("gemma2", "Gemma 2", "logit softcapping, alternating sliding windows"),
    _llama_like("gemma3_text", "Gemma 3 (text)", "local/global rotary, sliding window pattern"),
    Family("phi3", "Phi-3", "model.layers", ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj"),
           fused_qkv=True, notes="fused qkv and gate/up projections"),
    _llama_like("granite", "Granite", "embedding/residual/attention multipliers, logits scaling"),
    _llama_like("olmo2", "OLMo 2", "post-norms, q/k norms"),
    _llama_like("smollm3", "SmolLM3", "NoPE layers"),
    Family("gpt2", "GPT-2", "transformer.h", ("c_attn", "c_proj"), ("c_fc",), conv1d=True, fused_qkv=True,
           notes="Conv1D projections (fan_in_fan_out), learned positions"),
    Family("opt", "OPT", "model.decoder.layers", _LLAMA_ATTN[:3] + ("out_proj",), ("fc1", "fc2"),
           notes="learned positions (offset 2)"),
    Family("gpt_neox", "GPT-NeoX/Pythia", "gpt_neox.layers", ("query_key_value", "dense"),
           ("dense_h_to_4h", "dense_4h_to_h"), fused_qkv=True, notes="partial rotary, parallel residual"),
    _llama_like("qwen3_moe", "Qwen3-MoE", "attention targets; experts refused", mlp_targets=(),
                experts=("experts", "gate_up_proj", "down_proj", "gate_proj", "up_proj")),
)}


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


def require(family: Family, path: str) -> None:
    """Refuse, naming the family and the path, what this family is not supported through."""
    if path not in family.paths:
        raise ValueError(f"{family.name} ({family.model_type}) is not supported under {path} "
                         f"(supported: {', '.join(family.paths)})")


def fan_in_fan_out(model_dir) -> bool:
    """Whether the model in model_dir (config.json's model_type) adapts Conv1D projections: PEFT
    writes fan_in_fan_out=True in adapter_config.json for them."""
    try:
        model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    family = FAMILIES.get(model_type)
    return bool(family and family.conv1d)


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
