"""`muxtune run --tp 2 --serve-port` as a user runs it: rank 0 answers over HTTP while the group
trains (each iteration's inference and training round decided on rank 0, run by both ranks in
lockstep), keeps serving once training is done, and the served adapter then decodes greedily as
PeftModel.generate does with the adapter the run saved, with PEFT's logprobs (within 1e-4)."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.helpers.data import task_doc
from tests.helpers.parallel_runs import make_workdir
from tests.helpers.parallel_serving import Server, peft_generate, peft_logprobs, wait_for

pytestmark = pytest.mark.slow
NEW = 12


def test_run_tp2_serves_while_training_then_equals_peft(tmp_path):
    from transformers import AutoTokenizer

    from muxtune.engine.model.loading import builtin_path

    make_workdir(tmp_path, [task_doc("rev", Path("data/reverse.jsonl"), r=4, seed=11, steps=6, lr=3e-2,
                                     targets=("q_proj", "k_proj", "v_proj", "o_proj"))])
    base = builtin_path("tiny-llama")
    prompt = AutoTokenizer.from_pretrained(base)("reverse: abcdef\n")["input_ids"]
    server = Server(["run", "tasks.yaml", "--output", "runs", "--no-progress", "--tp", "2", "--serve-port", "0",
                     "--max-num-seqs", "4", "--max-model-len", "128"], tmp_path)
    try:
        during = server.complete("rev", prompt, 4)  # answered between the group's training rounds
        assert during["usage"]["completion_tokens"] == 4
        wait_for(lambda: "training finished" in server.output, 300, "training to finish\n" + server.output)
        after = server.complete("rev", prompt, NEW, logprobs=0)
    finally:
        code = server.stop()
    # the launcher reports the signal that stopped it (its ranks' own codes are not collected then)
    assert code in (0, 128 + signal.SIGTERM), server.output
    assert after["system_fingerprint"] == "rev@step-6"
    adapter = next(p.parent for p in (tmp_path / "runs").rglob("rev/adapter_model.safetensors")
                   if "checkpoints" not in p.parts)
    expected = peft_generate(base, adapter, prompt, NEW)
    served = after["choices"][0]["logprobs"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert len(served["tokens"]) == NEW
    for tok, text in zip(expected, served["tokens"]):  # strings identify a byte-level token, bar undecodable bytes
        ref = tokenizer.decode([tok])
        assert ref == text or "\ufffd" in ref
    ref_lp = peft_logprobs(base, adapter, prompt, expected)  # a different token would give another logprob
    assert max(abs(a - b) for a, b in zip(served["token_logprobs"], ref_lp)) < 1e-4


def test_serve_tp2_a_failing_rank_fails_the_request_and_the_server_not_hangs(tmp_path):
    """Rank 1 cannot build the adapter rank 0 serves (its directory went away after rank 0 loaded
    it): the request gets an error at once, and every rank stops with rank 1's reason."""
    import shutil
    import time

    from muxtune.engine.model.families import FAMILIES
    from tests.engine.families.checkpoints import save_family_checkpoint
    from tests.helpers.parallel_serving import random_lora

    base = save_family_checkpoint("llama", tmp_path / "llama")
    random_lora(base, tmp_path / "lora", FAMILIES["llama"].attention_targets)
    server = Server(["serve", str(tmp_path / "lora"), "--base-model", str(base), "--port", "0", "--tp", "2",
                     "--max-num-seqs", "2", "--max-model-len", "64"], tmp_path)
    try:
        shutil.rmtree(tmp_path / "lora")  # rank 1 makes its copy at the first request that needs it
        t0 = time.monotonic()
        with pytest.raises(Exception) as failed:  # urllib: HTTPError 500 (or the connection closed)
            server.complete("lora", [5, 6, 7, 8], 4)
        wait_for(lambda: server.proc.poll() is not None, 90, "the group to stop\n" + server.output)
        elapsed = time.monotonic() - t0
    finally:
        code = server.stop()
    assert code != 0
    assert "rank 1: serving: AdapterError" in server.output, server.output  # rank 0 reports rank 1's reason
    assert elapsed < 90, elapsed
    assert getattr(failed.value, "code", 500) == 500
