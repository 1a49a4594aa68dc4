"""How a quantized base is asked for and what it refuses: the flag, the config a PEFT user writes,
the layouts packed weights cannot take, and the dense weight DoRA reads."""
from __future__ import annotations

import json

import pytest
import torch
from pydantic_settings import CliApp

from muxtune.engine.model import quantize


def test_quantize_flag_parses_and_refuses_unknown_storage():
    from muxtune.cli import RunCommand

    cfg = CliApp.run(RunCommand, cli_args=["t.yaml", "--quantize", "nf4"], cli_cmd_method_name="model_copy")
    assert cfg.quantize == "nf4"
    assert CliApp.run(RunCommand, cli_args=["t.yaml"], cli_cmd_method_name="model_copy").quantize == "none"
    with pytest.raises(ValueError, match="'none', 'nf4' or 'int8'"):
        CliApp.run(RunCommand, cli_args=["t.yaml", "--quantize", "fp4"], cli_cmd_method_name="model_copy")


def test_packed_weights_cannot_be_split():
    quantize.check_layout("nf4", tp=1, pp=1)
    quantize.check_layout("none", tp=2, pp=2)
    with pytest.raises(quantize.QuantizationUnavailable, match="cannot be split"):
        quantize.check_layout("int8", tp=2, pp=1)
    with pytest.raises(quantize.QuantizationUnavailable, match="cannot be split"):
        quantize.check_layout("nf4", tp=1, pp=2)


def test_load_config_is_what_qlora_users_write():
    pytest.importorskip("bitsandbytes")
    nf4 = quantize.load_kwargs("nf4", torch.device("cpu"), torch.bfloat16)
    cfg = nf4["quantization_config"]
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16 and nf4["device_map"] == {"": torch.device("cpu")}
    int8 = quantize.load_kwargs("int8", torch.device("cpu"), torch.float32)["quantization_config"]
    assert int8.load_in_8bit and int8.llm_int8_threshold == 0.0
    assert quantize.load_kwargs("none", torch.device("cpu"), torch.float32) == {}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dense_weight_is_what_the_quantized_module_computes_with(kind):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48, bias=False)
    if kind == "nf4":
        q = Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:
        q = Linear8bitLt(64, 48, bias=False, has_fp16_weights=False, threshold=0.0)
        q.weight = Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q = q.to("cpu")
    assert quantize.is_quantized(q) and not quantize.is_quantized(dense)
    w = quantize.dense_weight(q, torch.float32)
    assert w.shape == (48, 64)
    assert (w - dense.weight).abs().max() < (0.2 if kind == "nf4" else 0.01) * dense.weight.abs().max()  # 16 levels vs 255
    if kind == "nf4":  # NF4 computes with exactly this dequantized weight
        x = torch.randn(5, 64)
        assert torch.allclose(q(x), x @ w.t(), atol=1e-6)



class _Crash(BaseException):
    """A simulated process death mid-run (not an error the engine handles)."""


def _crash_after(step):
    def hook(trainer, rt):
        if rt.step == step:
            raise _Crash(step)
    return hook


def test_a_checkpoint_resumes_only_on_the_base_it_was_trained_on(make_task, data_dir, tmp_path, trainer_factory):
    """An adapter half-trained over an NF4 base would go on over another function of the weights if
    resumed on the 16/32-bit base (or the other way round): refused naming both, the checkpoint kept."""
    pytest.importorskip("bitsandbytes")
    task = make_task("q", data_dir / "reverse.jsonl", steps=6, checkpointInterval=2)
    first = trainer_factory(tmp_path / "out", quantization="nf4")
    first.step_hooks.append(_crash_after(3))
    first.add_task(task)
    with pytest.raises(_Crash):
        first.run()
    ckpts = sorted((first.tasks[task.key].out_dir / "checkpoints").iterdir())
    assert ckpts and json.loads((ckpts[-1] / "state.json").read_text())["quantization"] == "nf4"

    dense = trainer_factory(tmp_path / "out")
    rt = dense.add_task(task)
    assert rt.phase == "Failed" and "'nf4'" in rt.message and "'none'" in rt.message and "--quantize nf4" in rt.message
    assert ckpts[-1].exists()

    again = trainer_factory(tmp_path / "out", quantization="nf4")
    rt = again.add_task(task)
    assert rt.phase != "Failed" and rt.step == 2, rt.message
    again.run()
    assert rt.phase == "Succeeded", rt.message
