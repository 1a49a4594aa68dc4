"""QLoRA round trip: adapters trained over a 4-bit (NF4) or 8-bit frozen base load with PeftModel on
the same quantized base (loaded as a PEFT user loads it) and reproduce the engine's validation loss.

bitsandbytes runs here on its CPU backend: the same Linear4bit / Linear8bitLt modules, loaded by the
same BitsAndBytesConfig, as on CUDA; no boundary is mocked.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the engine extra installs it)")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from tests.helpers.models import examples_loss  # noqa: E402

# fp32 compute over the same quantized weights: NF4 dequantizes alike in both processes and int8
# (vector-wise, no batch-wide outlier columns) quantizes each token alone, so the packed batch and
# each example alone differ only by fp32 summation order (measured: 1.8e-7 nf4, 5.8e-7 int8)
TOLERANCE = 1e-5


def _user_config(quantization: str) -> BitsAndBytesConfig:
    """What a PEFT user writes to load the base the adapters were trained on."""
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)  # per-token: see engine/model/quantize.py


@pytest.mark.parametrize("quantization", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_adapter_on_quantized_base_reproduces_validation_loss(quantization, make_task, data_dir, tmp_path,
                                                              trainer_factory):
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    from muxtune.api.finetunetask import FineTuneTask
    from tests.helpers.data import data_path, task_doc

    (data_dir / "val.jsonl").write_text("".join((data_dir / "reverse.jsonl").read_text().splitlines(True)[-6:]))
    doc = task_doc("q", data_dir / "reverse.jsonl", steps=4, r=8, lr=2e-2, targets=("q_proj", "v_proj", "down_proj"))
    doc["spec"]["dataset"]["validationPath"] = data_path(data_dir / "val.jsonl")
    task = FineTuneTask.model_validate(doc)
    neighbour = make_task("nb", data_dir / "upper.jsonl", steps=4, seed=4, method="ia3",
                          targets=("k_proj", "v_proj", "down_proj"), ff=("down_proj",))
    trainer = trainer_factory(tmp_path / "out", quantization=quantization)
    q_proj = trainer.backbone.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit if quantization == "nf4" else Linear8bitLt)
    for t in (task, neighbour):
        trainer.add_task(t)
    assert trainer.backbone.wrapped and all(w.quantized for w in trainer.backbone.wrapped.values())
    trainer.run()
    rt = trainer.tasks[task.key]
    assert rt.phase == "Succeeded", rt.message
    engine_loss = json.loads((rt.out_dir / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]

    config = json.loads((rt.out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trainer.backbone.path)
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32,
                                                quantization_config=_user_config(quantization), device_map={"": "cpu"})
    # CPU-only detail of bitsandbytes (not on CUDA, the user's path): on AVX512-BF16 CPUs it repacks
    # a 4-bit weight for inference, which needs out_features % 32 == 0 (this tiny model has 5 KV
    # heads' worth) and rounds the scales to bf16; the engine keeps the training format, so does the user here
    for m in base.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, rt.out_dir).eval()
    user_loss = examples_loss(model, rt.validation)
    assert abs(engine_loss - user_loss) <= TOLERANCE, (engine_loss, user_loss)
    # the adapter matters (the comparison means something), and so does the quantization
    with model.disable_adapter():
        assert abs(examples_loss(model, rt.validation) - user_loss) > 10 * TOLERANCE
    dense = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    dense_loss = examples_loss(PeftModel.from_pretrained(dense, rt.out_dir).eval(), rt.validation)
    assert abs(dense_loss - user_loss) > 10 * TOLERANCE
