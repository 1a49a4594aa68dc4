"""Tensor parallelism computes what one process computes: two real gloo ranks (tests/helpers/tp_worker.py)
against the same scenarios run here in one process, on tiny Llama, Qwen2 and biased Llama models and one
of each other family the engine splits (FAMILY_CONFIGS)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import helpers

WORKER = Path(helpers.__file__).with_name("tp_worker.py")  # started as a script, one process per rank
STEPS, SNAPSHOT_AT, TP = 4, 2, 2


def _worker():
    """The worker's scenarios, run here with tp=None: the single-process reference."""
    from tests.helpers import tp_worker

    return tp_worker


def _tiny(name: str, arch: str, **cfg) -> Path:
    """A small model of another architecture, built and saved once like the built-in ones."""
    from muxtune.engine.model.loading import _byte_tokenizer, generated_model

    spec = dict(arch=arch, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, bias_std=0.1, **cfg)

    def build(directory: Path) -> None:
        import transformers

        tokenizer = _byte_tokenizer()
        kw = {k: v for k, v in spec.items() if k not in ("arch", "bias_std")}
        config = getattr(transformers, f"{arch}Config")(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1,
                                                         eos_token_id=2, tie_word_embeddings=False, **kw)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
            for m in model.modules():  # HF starts biases at zero, where adding one twice would not show
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    torch.nn.init.normal_(m.bias, std=spec["bias_std"])
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return generated_model(name, spec, build)


@pytest.fixture(scope="module")
def models(muxtune_home) -> dict[str, Path]:
    from muxtune.engine.model.loading import builtin_path

    return {
        "llama": builtin_path("tiny-llama"),
        "qwen2": _tiny("tiny-qwen2", "Qwen2"),  # biased q/k/v (column-parallel bias)
        "llama_bias": _tiny("tiny-llama-bias", "Llama", attention_bias=True, mlp_bias=True),  # row-parallel bias
        **{name: _tiny(f"tiny-{name}", arch, **cfg) for name, (arch, cfg) in FAMILY_CONFIGS.items()},
    }


# the other families the engine splits (muxtune/facts/families.py), with what makes each differ (windows shorter
# than the batch's sequences, softcaps, q/k norms per head, multipliers, NoPE layers)
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=16)
FAMILY_CONFIGS = {
    "qwen3": ("Qwen3", dict(head_dim=16)),
    "mistral": ("Mistral", dict(sliding_window=8)),
    "gemma": ("Gemma", dict(head_dim=16)),
    "gemma2": ("Gemma2", dict(_GEMMA, sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3Text", dict(_GEMMA, sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "granite": ("Granite", dict(embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.3,
                                logits_scaling=0.5)),
    "smollm3": ("SmolLM3", dict(no_rope_layers=[1, 0])),
    # fused head-by-head query_key_value, partial rotary, parallel residual (targets renamed by role:
    # tests/helpers/tp_worker.py RENAMED)
    "gpt_neox": ("GPTNeoX", dict(rotary_pct=0.25, use_parallel_residual=True)),
    # attention split, fused experts replicated (attention targets only)
    "qwen3_moe": ("Qwen3Moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """(single-process results, [rank 0 results, rank 1 results])."""
    w = _worker()
    tmp = tmp_path_factory.mktemp("tp")
    single = {"train": w.train(models["llama"], None, STEPS, dtype=w.EXACT, snapshot_at=SNAPSHOT_AT)}
    torch.save(single["train"]["snapshot"], tmp / "single-snapshot.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    argv = [sys.executable, str(WORKER), "--world", str(TP), "--store", str(tmp / "store"), "--out", str(tmp),
            "--single-snapshot", str(tmp / "single-snapshot.pt"), "--steps", str(STEPS), "--snapshot-at", str(SNAPSHOT_AT)]
    argv += [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
    logs = [open(tmp / f"rank{r}.log", "w+") for r in range(TP)]
    procs = [subprocess.Popen(argv + ["--rank", str(r)], env=env, stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(TP)]
    try:
        # the reference, while the ranks work
        single.update({f"grads_{name}": w.grads(path, None) for name, path in models.items()})
        single["train_fp32"] = w.train(models["llama"], None, STEPS)
        single["resumed_from_single"] = w.train(models["llama"], None, STEPS, dtype=w.EXACT,
                                                start=single["train"]["snapshot"], start_step=SNAPSHOT_AT)
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    output = []
    for log in logs:
        log.seek(0)
        output.append(log.read()[-3000:])
        log.close()
    assert codes == [0] * TP, "tp ranks failed:\n" + "\n---\n".join(output)
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(TP)]
    single["resumed_from_tp"] = w.train(models["llama"], None, STEPS, dtype=w.EXACT,
                                        start=ranks[0]["train"]["snapshot"], start_step=SNAPSHOT_AT)
    return single, ranks


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "qwen2", "llama_bias", *FAMILY_CONFIGS])
def test_logits_and_every_delta_gradient_equal_single_process(runs, model):
    single, ranks = runs
    ref = single[f"grads_{model}"]
    for rank in ranks:
        got = rank[f"grads_{model}"]
        # 1e-5 of the logits' scale: fp32 reassociation of the row-parallel sums (one process is itself
        # ~1.5e-6 relative off an fp64 run of this batch; tp lands as close)
        assert (got["logits"] - ref["logits"]).abs().max().item() < 1e-5 * max(1.0, ref["logits"].abs().max().item())
        assert abs(got["loss"].item() - ref["loss"].item()) < 1e-5
        for slot, grads in ref["grads"].items():
            assert _max_diff(got["grads"][slot], grads) < 1e-5, slot
            assert all(g.abs().max() > 0 for g in grads.values()), "every gradient is non-trivial"
            assert abs(got["norm"][slot].item() - ref["norm"][slot].item()) < 1e-5 * ref["norm"][slot].item()


@pytest.mark.slow
def test_deltas_and_base_weights_hold_only_their_shard(runs):
    single, ranks = runs
    ref = single["grads_llama"]
    column = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    for rank in ranks:
        got = rank["grads_llama"]
        for name, whole in ref["base_shapes"].items():
            if name.rsplit(".", 1)[-1] in column:
                assert got["base_shapes"][name] == (whole[0] // TP, whole[1]), name
            else:
                assert got["base_shapes"][name] == (whole[0], whole[1] // TP), name
        for slot, shapes in ref["shapes"].items():
            for name, whole in shapes.items():
                parts = name.split(".")
                proj, param = (parts[-2], "ia3_l") if parts[-1] == "ia3_l" else (parts[-3], parts[-2])
                col = proj in column
                if param == "lora_A":
                    split = None if col else 1
                elif param == "lora_B":
                    split = 0 if col else None
                else:  # IA3: (out, 1) scales outputs, (1, in) inputs
                    scales_out = whole[1] == 1
                    split = (0 if scales_out else None) if col else (None if scales_out else 1)
                expect = list(whole)
                if split is not None:
                    expect[split] //= TP
                assert got["shapes"][slot][name] == tuple(expect), (slot, name, whole)
        assert rank["train"]["shard_shapes_ok"]


@pytest.mark.slow
def test_a_training_step_only_all_reduces(runs):
    """No delta (nor anything else) is gathered whole during a step: the only collectives of a whole
    step (forward, backward, grad sync, clipping, AdamW) are all-reduces."""
    _single, ranks = runs
    for rank in ranks:
        comms = rank["train"]["comms"]
        assert comms and all("all_reduce" in k or "allreduce" in k for k in comms), comms
        assert sum(comms.values()) >= 4 * 4, comms  # 4 layers x (2 forward + 2 backward) at least


@pytest.mark.slow
def test_training_three_tasks_matches_single_process(runs):
    """LoRA r4, LoRA r16 (dropout 0.1) on attention+MLP, IA3 with feed-forward modules; AdamW; clipping."""
    single, ranks = runs
    ref = single["train"]
    clipped = [n for step in ref["norms"] for n in step if n > _worker().MAX_NORM]
    assert clipped, "clipping must have acted for the comparison to cover it"
    for rank in ranks:
        got = rank["train"]
        for slot, whole in ref["final"]["adapters"].items():
            assert _max_diff(got["final"]["adapters"][slot], whole) < 1e-4, slot
            moved = max(v.abs().max().item() for k, v in whole.items() if "lora_B" in k) if slot < 2 else \
                max((v - 1).abs().max().item() for v in whole.values())
            assert moved > 1e-3, "training moved the adapter"
        for step_ref, step_got in zip(ref["norms"], got["norms"]):
            assert all(abs(a - b) < 1e-5 * max(1.0, a) for a, b in zip(step_ref, step_got))


@pytest.mark.slow
def test_fp32_training_stays_with_single_process(runs):
    """In fp32 the same run agrees but for a few elements whose gradient is ~0 by cancellation
    (see tp_worker.EXACT): nearly every weight within 1e-4, none off by a learning-rate step."""
    single, ranks = runs
    ref = single["train_fp32"]["final"]["adapters"]
    for rank in ranks:
        got = rank["train_fp32"]["final"]["adapters"]
        diffs = torch.cat([(got[s][k] - v).abs().flatten() for s in ref for k, v in ref[s].items()])
        assert (diffs > 1e-4).float().mean().item() < 1e-3
        assert diffs.max().item() < 1e-3


@pytest.mark.slow
def test_checkpoint_state_is_whole_and_resumes_under_another_layout(runs):
    single, ranks = runs
    ref = single["train"]["snapshot"]
    for rank in ranks:
        snap = rank["train"]["snapshot"]
        for slot in ref["adapters"]:
            assert _max_diff(snap["adapters"][slot], ref["adapters"][slot]) < 1e-4
            for name, state in ref["optimizer"][slot].items():
                got = snap["optimizer"][slot][name]
                assert got.keys() == state.keys() and int(got["step"]) == int(state["step"]) == SNAPSHOT_AT
                for key in ("exp_avg", "exp_avg_sq"):
                    assert got[key].shape == state[key].shape
                    assert (got[key] - state[key]).abs().max().item() < 1e-4, (name, key)
    # tp=2 from a one-process checkpoint, one process from a tp=2 checkpoint, one from one: same ends
    base = single["resumed_from_single"]["final"]["adapters"]
    for slot, whole in base.items():
        assert _max_diff(single["resumed_from_tp"]["final"]["adapters"][slot], whole) < 1e-4
        for rank in ranks:
            assert _max_diff(rank["resumed_from_single"]["final"]["adapters"][slot], whole) < 1e-4


@pytest.mark.slow
def test_gather_then_load_round_trips(runs):
    _single, ranks = runs
    assert all(rank[f"grads_{m}"]["roundtrip_ok"] for rank in ranks for m in ("llama", "qwen2", "llama_bias"))


@pytest.mark.slow
def test_refusals_say_why(runs):
    _single, ranks = runs
    for rank in ranks:
        msg = rank["refusals"]
        assert "before any task is attached" in msg["after_attach"]
        assert "must divide" in msg["heads"] and "(4)" in msg["heads"] and "(1)" in msg["heads"]


# ----- in one process: the per-rank pieces --------------------------------------------------------
def _spec(**peft):
    from muxtune.api.finetunetask import PeftSpec

    return PeftSpec.model_validate(peft)


def _deltas(spec, dim: str, base: torch.nn.Linear, module: str = "layers.0.mlp.down_proj"):
    """A whole delta and its blocks on each of TP ranks, all made from the same seeded generator."""
    from muxtune.engine.peft.base import ShardSpec
    from muxtune.engine.peft.registry import get_method

    method = get_method(spec.method)
    whole = method.make_delta(base, module, spec, torch.Generator().manual_seed(7))
    parts = []
    for rank in range(TP):
        d = method.make_delta(base, module, spec, torch.Generator().manual_seed(7))
        d.shard_(ShardSpec(dim, rank, TP, base.in_features, base.out_features))
        parts.append(d)
    return whole, parts


@pytest.mark.parametrize("dim", ["out", "in"], ids=["column", "row"])
def test_sharded_lora_with_dropout_sums_to_the_whole(dim):
    """Each rank starts with its block of the one-process init; column ranks' outputs concatenate and
    row ranks' partial terms add up to what one process computes, dropout mask included."""
    base = torch.nn.Linear(32, 24, bias=False)
    whole, parts = _deltas(_spec(method="lora", r=4, alpha=8, dropout=0.3), dim, base)
    for r, d in enumerate(parts):
        a = whole.lora_A if dim == "out" else whole.lora_A[:, 16 * r:16 * (r + 1)]
        assert torch.equal(d.lora_A, a) and not d.lora_B.any()
        assert d.lora_B.shape == ((12, 4) if dim == "out" else (24, 4))
    with torch.no_grad():
        whole.lora_B.normal_()
    for d in parts:
        d.load_peft_state(dict(whole.peft_state()))  # whole tensors in, each rank keeps its block
    x = torch.randn(10, 32)
    want = whole.additive(x)
    if dim == "out":
        got = torch.cat([d.additive(x) for d in parts], dim=1)
    else:
        got = sum(d.additive(x[:, 16 * r:16 * (r + 1)]) for r, d in enumerate(parts))
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("ff", [False, True], ids=["output-scale", "input-scale"])
@pytest.mark.parametrize("dim", ["out", "in"], ids=["column", "row"])
def test_ia3_scale_is_split_only_along_the_split_features(dim, ff):
    base = torch.nn.Linear(32, 24, bias=False)
    whole, parts = _deltas(_spec(method="ia3", targetModules=["down_proj"],
                                 feedforwardModules=["down_proj"] if ff else []), dim, base)
    split = (dim == "in") == ff  # input scales split on row layers, output scales on column layers
    for d in parts:
        n = whole.ia3_l.numel()
        assert d.ia3_l.numel() == (n // TP if split else n)


def test_one_rank_changes_nothing(tiny_backbone_dir):
    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import load_backbone
    from muxtune.engine.parallel import tensor as tpar

    bb = MultiplexedBackbone(load_backbone(tiny_backbone_dir, torch.device("cpu"), torch.float32))
    weights = {n: m.weight for n, m in bb.linears.items()}
    assert tpar.apply_tensor_parallel(bb, None) is None
    assert not bb.shards and all(m.weight is weights[n] for n, m in bb.linears.items())
    adapter = bb.attach(0, _spec(method="lora", r=4, alpha=8, targetModules=["q_proj", "o_proj"]), 3)
    assert all(d.shard is None for d in adapter.deltas.values())
    for p in adapter.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in adapter.parameters()]
    tpar.sync_replicated_grads(adapter, None)
    assert all(torch.equal(p.grad, g) for p, g in zip(adapter.parameters(), grads))
    twins = [torch.nn.Parameter(p.detach().clone()) for p in adapter.parameters()]
    for t, g in zip(twins, grads):
        t.grad = g.clone()
    want = torch.nn.utils.clip_grad_norm_(twins, 0.1)
    assert torch.equal(tpar.clip_grad_norm_(adapter, 0.1, None), want) and want > 0.1
    assert all(torch.equal(p.grad, t.grad) for p, t in zip(adapter.parameters(), twins))
    full = tpar.gather_full_state(adapter, None)
    assert full.keys() == adapter.peft_state_dict().keys()
