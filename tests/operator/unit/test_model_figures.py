"""A BaseModel's figures: typed ones win, the rest read from config.json where the operator can
(operator/model_figures.py); a clear message naming what is missing otherwise. No torch here."""
from __future__ import annotations

import json
import struct

from muxtune.api.basemodel import BaseModelResource
from muxtune.facts.builtin_models import BUILTIN_ARCHITECTURES
from muxtune.operator import transfers
from muxtune.operator.config import OperatorConfig
from muxtune.operator.model_figures import basemodel_figures
from muxtune.operator.transfer_plan import plan_transfers

# a Qwen3-MoE config.json as save_pretrained writes it (the keys the figures come from)
MOE = {"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 259,
       "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "tie_word_embeddings": False,
       "sliding_window": None, "use_sliding_window": False}
MOE_PARAMETERS = 35456  # sum(p.numel()) of that model (tests/engine/families/test_config_figures.py checks the count)


def _bm(source: dict, architecture: dict | None = None, status: dict | None = None) -> dict:
    spec = {"source": source, "allowedNamespaces": ["*"], **({"architecture": architecture} if architecture else {})}
    return {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": "m"}, "spec": spec,
            **({"status": status} if status else {})}


def _model_dir(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_builtin_needs_no_figures():
    assert basemodel_figures(_bm({"builtin": "tiny-llama"})) == (BUILTIN_ARCHITECTURES["tiny-llama"], "")


def test_a_host_path_source_alone_is_sized_from_its_config_json(tmp_path):
    arch, why = basemodel_figures(_bm({"hostPath": {"path": str(_model_dir(tmp_path, MOE))}}))
    assert why == ""
    assert (arch.parameters, arch.layers, arch.hidden_size, arch.num_key_value_heads, arch.head_dim) == (
        MOE_PARAMETERS, 2, 32, 2, 8)
    assert (arch.model_type, arch.num_experts, arch.num_experts_per_tok, arch.moe_intermediate_size) == (
        "qwen3_moe", 4, 2, 16)
    assert arch.sliding_window is None and arch.dtype == "bfloat16"  # the engine's dtype on GPUs, not the file's


def test_typed_figures_win_over_figures_read(tmp_path):
    bm = _bm({"hostPath": {"path": str(_model_dir(tmp_path, MOE))}}, {"parameters": 40000, "dtype": "float32"})
    arch, _ = basemodel_figures(bm)
    assert (arch.parameters, arch.dtype, arch.hidden_size) == (40000, "float32", 32)


def test_missing_figures_are_named_with_why_config_json_did_not_give_them(tmp_path):
    arch, why = basemodel_figures(_bm({"hostPath": {"path": str(tmp_path / "absent")}}, {"layers": 4}))
    assert arch is None
    assert why.startswith("missing architecture figures parameters, hiddenSize: set them in spec.architecture")
    assert f"{tmp_path}/absent/config.json is not readable" in why
    arch, why = basemodel_figures(_bm({"pvc": {"claimName": "weights"}}))
    assert arch is None and "parameters, layers, hiddenSize" in why and "PersistentVolumeClaim" in why
    arch, why = basemodel_figures(_bm({"hf": {"repo": "org/name"}}))
    assert arch is None and "not staged yet" in why


def test_an_unknown_family_is_counted_from_its_safetensors_headers(tmp_path):
    _model_dir(tmp_path, {"model_type": "newfamily", "hidden_size": 8, "num_hidden_layers": 1})
    header = json.dumps({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [8, 3], "data_offsets": [0, 96]},
                         "b": {"dtype": "F32", "shape": [5], "data_offsets": [96, 116]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(116))
    arch, why = basemodel_figures(_bm({"hostPath": {"path": str(tmp_path)}}))
    assert why == "" and arch.parameters == 29 and arch.model_type == "newfamily"


def test_a_staged_model_is_sized_from_what_its_job_read():
    """hf/s3: the model-cache Job's termination message is its cache path, then config.json's figures
    (muxtune/storage/stage_cli.py); the status keeps them and the figures come from there."""
    cfg = OperatorConfig(model_cache_pvc="cache")
    bm = _bm({"hf": {"repo": "org/name"}})
    job = transfers.model_job(BaseModelResource.model_validate(bm), cfg)
    key = (job["metadata"]["namespace"], job["metadata"]["name"])
    from muxtune.facts.config_figures import config_figures

    message = f"models/hf-0123\n{json.dumps(config_figures(MOE))}"
    plan = plan_transfers({}, {"m": bm}, {key: dict(job, status={"conditions": [{"type": "Complete", "status": "True"}]})},
                          {key: [{"terminationMessage": message}]}, cfg)
    status = plan.models["m"]
    assert status["phase"] == "Ready" and status["cachePath"] == "models/hf-0123"
    assert status["configArchitecture"]["parameters"] == MOE_PARAMETERS and status["configArchitecture"]["numExperts"] == 4
    arch, why = basemodel_figures(_bm({"hf": {"repo": "org/name"}}, status=status))
    assert why == "" and arch.parameters == MOE_PARAMETERS
    # an older Job's message (the path alone) still stages; the figures are then missing, and said so
    plan = plan_transfers({}, {"m": bm}, {key: dict(job, status={"conditions": [{"type": "Complete", "status": "True"}]})},
                          {key: [{"terminationMessage": "models/hf-0123"}]}, cfg)
    assert plan.models["m"]["cachePath"] == "models/hf-0123" and "configArchitecture" not in plan.models["m"]


# published configs (the keys that matter) and their models' published parameter counts
PUBLISHED = {
    "Llama-3-8B": (dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                        attention_bias=False, mlp_bias=False), 8_030_261_248),
    "gpt2": (dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
             124_439_808),
    "opt-125m": (dict(model_type="opt", hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=2048, vocab_size=50272, word_embed_proj_dim=768,
                      do_layer_norm_before=True, enable_bias=True), 125_239_296),
    "pythia-160m": (dict(model_type="gpt_neox", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, vocab_size=50304, tie_word_embeddings=False), 162_322_944),
}


def test_published_models_are_counted_as_published():
    from muxtune.facts.config_figures import config_figures

    for name, (config, parameters) in PUBLISHED.items():
        assert config_figures(config)["parameters"] == parameters, name


def test_a_changed_config_json_is_read_again(tmp_path):
    import os

    bm = _bm({"hostPath": {"path": str(_model_dir(tmp_path, MOE))}})
    assert basemodel_figures(bm)[0].layers == 2
    _model_dir(tmp_path, dict(MOE, num_hidden_layers=3))
    st = (tmp_path / "config.json").stat()
    os.utime(tmp_path / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert basemodel_figures(bm)[0].layers == 3
