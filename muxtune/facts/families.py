"""Model families: the few facts about each architecture that muxtune cannot read off the model's
own forward, keyed by `config.model_type` (as vLLM's model registry and torchtitan's models/ are),
one entry per family. Torch-free: the engine (engine/model/families.py adds what needs the model
object: finding the layers, Conv1D as Linear views), tensor parallelism (its split plan:
muxtune/facts/shards.py derives the name tables from here) and the operator's memory model (the
parameter layout: muxtune/facts/config_figures.py) all read this registry.

What is declared per family: where the decoder layers live (pipeline stages split and skip them),
which projections are GPT-2-style Conv1D (weight stored [in, out], adapted as PEFT does with
fan_in_fan_out), which modules hold fused MoE experts (not adaptable yet), fused q/k/v, the
attention targets, the Linears by tensor-parallel role (:class:`Shards`), the parameter layout
(:class:`Layout`), and the paths (`PATHS`) the family is tested through in tests/engine/families/
(the README's table is checked against this by a test). A path not listed for a family fails that
family's tasks naming both, and for tp why (`require`). ``REGISTRY`` also names a few families the
engine does not run (no paths) so that the memory model knows their projection names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from muxtune.facts.layouts import Layout, Shards

# every path a task can take; each family lists those it is tested through (serve: the serving
# engine's greedy tokens equal PeftModel.generate; tp: the family's split plan, tested equal to one
# process in tests/engine/parallel/test_tensor_parallel.py)
PATHS = ("train", "dp", "pp", "eval", "export", "serve", "tp")
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
    tp_refusal: str = ""  # why tensor parallelism cannot split this family (said when it is refused)
    shards: Shards | None = None  # Linears by tensor-parallel role (regions set: the engine splits them)
    layout: Layout | None = None  # how its parameters are laid out (None: not counted from config.json)

    def unsupported_targets(self, targets: list[str]) -> str | None:
        """Why these PEFT targets cannot be adapted on this family, or None."""
        hit = sorted(t for t in targets if any(t == e or t.endswith("." + e) or e.endswith("." + t) for e in self.experts))
        if hit:
            return (f"peft.targetModules {hit}: the {self.name} experts are fused 3D parameters, not Linear layers; "
                    f"adapting MoE experts is not supported (target the attention: {', '.join(self.attention_targets)})")
        return None


_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
_KV = ("k_proj", "v_proj")
_LLAMA_SHARDS = Shards(("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",),
                       kv=_KV, regions=("self_attn", "mlp"))


def _llama_like(model_type: str, name: str, notes: str = "", layout: Layout = Layout(), tp: bool = True,
                **kw) -> Family:
    """Llama's projection names, attention modules that view q/k/v by head_dim alone (so a rank's
    block of whole heads runs unchanged) and a Llama-like block of ``layout``."""
    kw.setdefault("mlp_targets", _LLAMA_MLP)
    kw.setdefault("shards", _LLAMA_SHARDS)
    return Family(model_type, name, "model.layers", _LLAMA_ATTN, notes=notes, layout=layout,
                  paths=PATHS if tp else _UNTESTED_TP, **kw)


_FUSED_QKV = "its attention splits the fused {} at the whole model's sizes, not a rank's block of heads"
_GEMMA2 = Layout(norms=4)  # pre- and post-norms around attention and the MLP


REGISTRY: dict[str, Family] = {f.model_type: f for f in (
    _llama_like("llama", "Llama", "3.x rope scaling"),
    _llama_like("qwen2", "Qwen2/2.5", "optional sliding window layers", Layout(qkv_bias=True, o_bias=False)),
    _llama_like("qwen3", "Qwen3", "q/k norms", Layout(qk_norm="head")),
    _llama_like("mistral", "Mistral", "sliding window", Layout(qkv_bias=False, o_bias=False)),
    _llama_like("gemma", "Gemma", "embedding scale"),
    _llama_like("gemma2", "Gemma 2", "logit softcapping, alternating sliding windows", _GEMMA2),
    _llama_like("gemma3_text", "Gemma 3 (text)", "local/global rotary, sliding window pattern",
                Layout(norms=4, qk_norm="head")),
    Family("phi3", "Phi-3", "model.layers", ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj"),
           fused_qkv=True, notes="fused qkv and gate/up projections",
           tp_refusal=_FUSED_QKV.format("qkv_proj (config.num_attention_heads)"),
           shards=Shards(("qkv_proj",), ("o_proj",), ("gate_up_proj",), ("down_proj",)),
           layout=Layout(qkv_bias=False, o_bias=False)),
    _llama_like("granite", "Granite", "embedding/residual/attention multipliers, logits scaling"),
    # OLMo 2 normalises q and k over all heads at once (RMSNorm over heads x head_dim): not split
    _llama_like("olmo2", "OLMo 2", "post-norms, q/k norms", Layout(qk_norm="all"), tp=False,
                shards=replace(_LLAMA_SHARDS, regions=None),
                tp_refusal="its q/k norms normalise over all heads at once (RMSNorm over heads x head_dim)"),
    _llama_like("smollm3", "SmolLM3", "NoPE layers"),
    # GPT-2 names both output projections c_proj: it is sized as attention's (hidden x hidden)
    Family("gpt2", "GPT-2", "transformer.h", ("c_attn", "c_proj"), ("c_fc",), conv1d=True, fused_qkv=True,
           notes="Conv1D projections (fan_in_fan_out), learned positions",
           tp_refusal=_FUSED_QKV.format("c_attn (split_size = the hidden size)"),
           shards=Shards(("c_attn",), ("c_proj",), ("c_fc",), ()), layout=Layout("gpt2", mlp_matrices=2)),
    Family("opt", "OPT", "model.decoder.layers", _LLAMA_ATTN[:3] + ("out_proj",), ("fc1", "fc2"),
           notes="learned positions (offset 2)",
           tp_refusal="its attention views q/k/v with the whole model's head count (self.num_heads)",
           shards=Shards(("q_proj", "k_proj", "v_proj"), ("out_proj",), ("fc1",), ("fc2",), kv=_KV),
           layout=Layout("opt", mlp_matrices=2)),
    # NeoX's fused query_key_value is laid out head by head ([q k v] per head), so a block of whole
    # heads is a contiguous block of rows: it splits as a column-parallel Linear
    Family("gpt_neox", "GPT-NeoX/Pythia", "gpt_neox.layers", ("query_key_value", "dense"),
           ("dense_h_to_4h", "dense_4h_to_h"), fused_qkv=True, notes="partial rotary, parallel residual", paths=PATHS,
           shards=Shards(("query_key_value",), ("dense",), ("dense_h_to_4h",), ("dense_4h_to_h",),
                         regions=("attention", "mlp")),
           layout=Layout("gpt_neox", mlp_matrices=2)),
    # its attention splits; the fused experts stay replicated (no Linears in the plan)
    _llama_like("qwen3_moe", "Qwen3-MoE", "attention targets; experts refused", Layout(qk_norm="head", experts=True),
                mlp_targets=(), experts=("experts", "gate_up_proj", "down_proj", "gate_proj", "up_proj")),
    # named for the memory model only (projection names and roles); the engine does not run them
    Family("phi", "Phi-1/2", "", (), paths=(),
           shards=Shards(("q_proj", "k_proj", "v_proj"), ("dense",), ("fc1",), ("fc2",), kv=_KV)),
    Family("bert", "BERT", "", (), paths=(), shards=Shards(("query", "key", "value"), ("dense",), (), (),
                                                           kv=("key", "value"))),
    Family("mixtral", "Mixtral", "", (), paths=(),
           shards=Shards(("q_proj", "k_proj", "v_proj"), ("o_proj",), ("w1", "w3"), ("w2",), kv=_KV)),
)}

# the families the engine runs (every path they are tested through); the rest of REGISTRY only names
FAMILIES: dict[str, Family] = {k: f for k, f in REGISTRY.items() if f.paths}


def require(family: Family, path: str) -> None:
    """Refuse, naming the family and the path, what this family is not supported through."""
    if path not in family.paths:
        why = f": {family.tp_refusal}" if path == "tp" and family.tp_refusal else ""
        raise ValueError(f"{family.name} ({family.model_type}) is not supported under {path}{why} "
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
