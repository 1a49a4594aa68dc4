"""The fidelity probe refuses a backbone whose packed forward differs from the model's own, naming
the architecture and the difference, and its tasks fail without training; the kernel choice for
windows and softcaps (the CUDA side cannot run here: the choice is a pure function, tested as such)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from muxtune.engine.model import attention, stage
from muxtune.engine.model.backbone import MultiplexedBackbone
from muxtune.engine.model.loading import ModelLoadError, load_backbone
from tests.helpers.data import task_doc, write_jsonl


def _load(path):
    return MultiplexedBackbone(load_backbone(path, torch.device("cpu"), torch.float32))


def _ignore_windows(monkeypatch):
    """The bug the probe exists for: packed attention that drops the model's sliding window."""
    real = attention.segment_attention
    monkeypatch.setattr(attention, "segment_attention",
                        lambda q, k, v, bounds, scale, dropout=0.0, window=None, softcap=None:
                        real(q, k, v, bounds, scale, dropout, None, softcap))


def test_a_window_the_engine_ignores_is_refused_at_load(monkeypatch, family_checkpoint):
    path = family_checkpoint("mistral")
    assert _load(path).fidelity <= 1e-5
    _ignore_windows(monkeypatch)
    with pytest.raises(ModelLoadError, match=r"mistral \(MistralForCausalLM\): the engine's packed forward differs "
                                             r"from the model's own forward by \d"):
        _load(path)


def test_a_softcap_the_engine_ignores_is_refused_at_load(monkeypatch, family_checkpoint):
    real = attention.segment_attention
    monkeypatch.setattr(attention, "segment_attention", lambda q, k, v, bounds, scale, dropout=0.0, window=None,
                        softcap=None: real(q, k, v, bounds, scale, dropout, window, None))
    with pytest.raises(ModelLoadError, match=r"gemma2 \(Gemma2ForCausalLM\)"):
        _load(family_checkpoint("gemma2"))


def test_a_pipeline_split_that_loses_the_hidden_states_is_refused(monkeypatch, family_checkpoint):
    """The probe runs the layers as two stages too: a later stage that ignored what it received
    (here: the injection hook made a no-op) would train on garbage under --pp."""
    monkeypatch.setattr(stage, "_inject", lambda hidden: (lambda module, args, kwargs: None))
    with pytest.raises(ModelLoadError, match=r"gpt2 \(GPT2LMHeadModel\)"):
        _load(family_checkpoint("gpt2"))


def test_a_refused_backbone_fails_its_tasks_and_trains_nothing(monkeypatch, family_checkpoint, tmp_path):
    from muxtune.cli import RunCommand
    from muxtune.engine.run import run_from_cli

    write_jsonl(tmp_path / "d.jsonl", 8)
    doc = task_doc("t", tmp_path / "d.jsonl", base=str(family_checkpoint("mistral")), steps=2)
    doc["spec"]["dataset"]["path"] = "d.jsonl"
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(tmp_path)
    _ignore_windows(monkeypatch)
    code = run_from_cli(RunCommand(tasks=["tasks.yaml"], output=tmp_path / "out", progress=False, device="cpu"))
    status = json.loads((tmp_path / "out" / "default" / "t" / "status.json").read_text())
    assert code == 1 and status["phase"] == "Failed"
    assert "mistral (MistralForCausalLM)" in status["message"] and "differs from the model's own forward by" in status["message"]
    assert not (tmp_path / "out" / "default" / "t" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("device,dtype,window,softcap,torch_varlen,flash,want", [
    ("cpu", torch.float32, None, None, True, True, "segments"),
    ("cpu", torch.bfloat16, 8, 50.0, True, True, "segments"),
    ("cuda", torch.float32, None, None, True, True, "segments"),  # fp32: no flash kernel
    ("cuda", torch.bfloat16, None, None, True, True, "torch_varlen"),
    ("cuda", torch.bfloat16, 8, None, True, True, "flash_attn"),  # torch's varlen: causal only
    ("cuda", torch.bfloat16, None, 50.0, True, True, "flash_attn"),
    ("cuda", torch.float16, 8, 50.0, True, False, "segments"),  # no flash-attn: per sequence, exact
    ("cuda", torch.bfloat16, None, None, False, True, "flash_attn"),
])
def test_kernel_choice(device, dtype, window, softcap, torch_varlen, flash, want):
    assert attention.choose_kernel(device, dtype, window, softcap, 0.0, torch_varlen, flash) == want


def test_flash_attn_gets_the_window_and_softcap(monkeypatch):
    """flash-attn's contract (mocked: no GPU here): window_size (W - 1, 0) for a window of W keys,
    softcap as given, causal, the same cu tensor for queries and keys."""
    seen = {}

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        seen.update(window=window_size, softcap=softcap, causal=causal, same=cu_q is cu_k, max=max_q)
        return q

    monkeypatch.setattr(attention, "_flash_attn_varlen", fake)
    q = torch.zeros(10, 2, 4)
    attention.varlen_call(q, q, q, torch.tensor([0, 6, 10]), 6, None, window=4, softcap=30.0, kernel="flash_attn")
    assert seen == dict(window=(3, 0), softcap=30.0, causal=True, same=True, max=6)


def test_segments_honour_window_and_softcap_as_eager_does():
    """The CPU path against the eager reference written out: scores, softcap, banded causal mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 4, 8, generator=g) for _ in range(3))
    window, cap, scale = 5, 2.0, 8 ** -0.5
    got = attention.segment_attention(q, k, v, [0, 7, 12], scale, window=window, softcap=cap)
    for a, b in ((0, 7), (7, 12)):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        s = torch.tanh(qs @ ks.transpose(-1, -2) * scale / cap) * cap
        i = torch.arange(b - a)
        s = s.masked_fill(~((i[None] <= i[:, None]) & (i[:, None] - i[None] < window)), float("-inf"))
        want = (s.softmax(-1) @ vs).transpose(0, 1)
        assert (got[a:b] - want).abs().max() < 1e-6
