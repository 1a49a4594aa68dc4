"""One rank of the tensor-parallel tests (tests/engine/parallel/test_tensor_parallel.py starts two over gloo).

The test imports this file too and runs the same scenarios with tp=None: the single-process reference.
Each scenario returns plain tensors (whole ones, gathered under PEFT's names) for the test to compare.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.model.backbone import MultiplexedBackbone
from muxtune.engine.data.dataset import DataStream, encode
from muxtune.engine.model.loading import load_backbone
from muxtune.engine.packing import PackedSequence, pack
from muxtune.engine.parallel import tensor as tpar

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# LoRA r4, LoRA r16 (with dropout) on attention+MLP, IA3 scaling outputs (k, v, o) and inputs (up, down):
# between them every kind of delta parameter on column and row layers
TASKS = [
    dict(slot=0, seed=11, batch=4, lr=5e-3, kind="reverse",
         peft=dict(method="lora", r=4, alpha=8, targetModules=["q_proj", "v_proj"])),
    dict(slot=1, seed=12, batch=6, lr=5e-3, kind="upper",
         peft=dict(method="lora", r=16, alpha=32, dropout=0.1, targetModules=ATTN_MLP)),
    dict(slot=2, seed=13, batch=4, lr=3e-2, kind="reverse",
         peft=dict(method="ia3", targetModules=["k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                   feedforwardModules=["up_proj", "down_proj"])),
]
MAX_NORM = 0.5  # low enough that some steps clip
# Training runs compared weight for weight use an fp64 backbone (adapters and AdamW stay fp32, as the
# engine keeps them): in fp32, a gradient element that is ~0 by cancellation carries absolute noise
# from any reordering of the sums (tp's split reductions: ~4e-8), and AdamW's first, sign-like steps
# turn that into up to lr-sized differences in a few such elements. fp32 training is bounded separately.
EXACT = torch.float64


def backbone(path: Path, tp, dtype: torch.dtype = torch.float32) -> MultiplexedBackbone:
    bb = MultiplexedBackbone(load_backbone(path, torch.device("cpu"), dtype))
    tpar.apply_tensor_parallel(bb, tp)
    return bb


# The tasks name Llama's projections; another family's by role: GPT-NeoX's fused query_key_value
# stands for q/k/v, dense for o, dense_h_to_4h for gate/up; Qwen3-MoE's MLP is its fused experts
# (not adaptable), so its tasks target the attention alone.
RENAMED = {
    "gpt_neox": {"q_proj": "query_key_value", "k_proj": "query_key_value", "v_proj": "query_key_value",
                 "o_proj": "dense", "gate_proj": "dense_h_to_4h", "up_proj": "dense_h_to_4h",
                 "down_proj": "dense_4h_to_h"},
    "qwen3_moe": {"gate_proj": None, "up_proj": None, "down_proj": None},
}


def peft_for(bb: MultiplexedBackbone, peft: dict) -> PeftSpec:
    """The task's PEFT spec with its targets named as the backbone's family names them."""
    names = RENAMED.get(bb.family.model_type, {})

    def rename(targets):
        return list(dict.fromkeys(n for t in targets if (n := names.get(t, t)) is not None))

    lists = {k: rename(peft[k]) for k in ("targetModules", "feedforwardModules") if k in peft}
    return PeftSpec.model_validate({**peft, **lists})


def attach_all(bb: MultiplexedBackbone) -> dict:
    return {t["slot"]: bb.attach(t["slot"], peft_for(bb, t["peft"]), t["seed"]) for t in TASKS}


def examples(tokenizer, kind: str, n: int, seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 14)))
        out.append(encode(tokenizer, f"{kind}: {w}\n", w[::-1] if kind == "reverse" else w.upper(), 48, False))
    return out


def step_loss(bb, batch, label_tokens: dict[int, int]) -> torch.Tensor:
    """The trainer's objective: each task's token-loss sum over its step's label tokens."""
    result = bb.forward_loss(batch)
    return sum(result.task_loss_sum[s] / n for s, n in label_tokens.items())


# ----- scenario 1: one packed forward/backward ---------------------------------------------------
def grads(path: Path, tp, scale: float = 0.05) -> dict:
    """Logits, losses and every delta's gradient for one packed batch of three tasks whose deltas
    hold random (non-zero) values loaded as whole tensors."""
    torch.manual_seed(0)
    bb = backbone(path, tp)
    adapters = attach_all(bb)
    roundtrip_ok = True
    for slot, ad in adapters.items():
        whole = tpar.gather_full_state(ad, tp)
        g = torch.Generator().manual_seed(100 + slot)
        rand = {k: torch.randn(v.shape, generator=g, dtype=torch.float32) * scale for k, v in sorted(whole.items())}
        if TASKS[slot]["peft"]["method"] == "ia3":
            rand = {k: 1 + v for k, v in rand.items()}
        tpar.load_full_state(ad, rand, tp)
        back = tpar.gather_full_state(ad, tp)
        roundtrip_ok = roundtrip_ok and all(torch.equal(back[k], rand[k]) for k in rand) and back.keys() == rand.keys()
    for ad in adapters.values():
        for p in ad.parameters():
            p.grad = None
    seqs, labels = [], {}
    for t in TASKS:
        exs = examples(bb.tokenizer, t["kind"], t["batch"], t["seed"])
        seqs += [PackedSequence(t["slot"], ex) for ex in exs]
        labels[t["slot"]] = sum(ex.label_tokens for ex in exs)
    batch = pack(seqs, None, bb.device, bb.tokenizer.pad_token_id, attn_ratio=bb.attn_ratio)
    bb.model.eval()  # no dropout: the gradients of one deterministic pass
    with torch.no_grad():
        logits = bb.logits(batch)
    loss = step_loss(bb, batch, labels)
    loss.backward()
    out = {"logits": logits, "loss": loss.detach(), "grads": {}, "norm": {}, "shapes": {}, "roundtrip_ok": roundtrip_ok}
    for slot, ad in adapters.items():
        tpar.sync_replicated_grads(ad, tp)
        named = tpar.named_parameters(ad)
        out["grads"][slot] = tpar.gather_full_state(ad, tp, {k: p.grad for k, p in named.items()})
        out["norm"][slot] = tpar.grad_norm(ad, tp) if tp is not None else \
            torch.nn.utils.clip_grad_norm_(ad.parameters(), float("inf"))
        out["shapes"][slot] = {k: tuple(p.shape) for k, p in named.items()}
    out["base_shapes"] = {n: tuple(lin.weight.shape) for n, lin in bb.linears.items()}
    return out


# ----- scenario 2: training --------------------------------------------------------------------------
def train(path: Path, tp, steps: int, *, dtype: torch.dtype = torch.float32, start: dict | None = None,
          start_step: int = 0, snapshot_at: int | None = None, count_comms: bool = False) -> dict:
    """AdamW steps of three fused tasks with clipping, as the trainer takes them. `start` resumes from
    whole state (adapters and optimizer) saved at `start_step` by any layout; as in the trainer, a
    resumed task's dropout stream restarts from its seed, so resumed runs are compared with each other."""
    bb = backbone(path, tp, dtype)
    bb.model.train()
    adapters = attach_all(bb)
    opts = {s: torch.optim.AdamW(ad.parameters(), lr=TASKS[s]["lr"], weight_decay=0.01) for s, ad in adapters.items()}
    streams = {t["slot"]: DataStream(examples(bb.tokenizer, t["kind"], 40, t["seed"]), t["seed"], True) for t in TASKS}
    for s, stream in streams.items():
        for _ in range(start_step):
            stream.next_batch(TASKS[s]["batch"])
    if start is not None:
        for s, ad in adapters.items():
            tpar.load_full_state(ad, start["adapters"][s], tp)
            tpar.load_optimizer_state(ad, opts[s], start["optimizer"][s])
    out = {"norms": [], "comms": None}
    for step in range(start_step, steps):
        seqs, labels = [], {}
        for t in TASKS:
            batch = streams[t["slot"]].next_batch(t["batch"])
            seqs += [PackedSequence(t["slot"], ex) for ex in batch]
            labels[t["slot"]] = sum(ex.label_tokens for ex in batch)
        packed = pack(seqs, None, bb.device, bb.tokenizer.pad_token_id, attn_ratio=bb.attn_ratio)

        def one_step():
            step_loss(bb, packed, labels).backward()
            norms = []
            for s, ad in adapters.items():
                tpar.sync_replicated_grads(ad, tp)
                norms.append(float(tpar.clip_grad_norm_(ad, MAX_NORM, tp)))
                opts[s].step()
                opts[s].zero_grad(set_to_none=True)
            return norms

        if count_comms and step == start_step and tp is not None:
            from torch.distributed.tensor.debug import CommDebugMode

            with CommDebugMode() as comm:
                out["norms"].append(one_step())
            out["comms"] = {str(k): v for k, v in comm.get_comm_counts().items()}
            out["shard_shapes_ok"] = _all_sharded(adapters)
        else:
            out["norms"].append(one_step())
        if snapshot_at is not None and step + 1 == snapshot_at:
            out["snapshot"] = _whole(adapters, opts, tp)
    out["final"] = _whole(adapters, opts, tp)
    return out


def _whole(adapters, opts, tp) -> dict:
    return {"adapters": {s: tpar.gather_full_state(ad, tp) for s, ad in adapters.items()},
            "optimizer": {s: tpar.gather_optimizer_state(ad, opts[s], tp) for s, ad in adapters.items()}}


def _all_sharded(adapters) -> bool:
    """Every delta parameter of a split layer holds only its block along the split features."""
    for ad in adapters.values():
        for delta in ad.deltas.values():
            if delta.shard is None:
                return False
            for attr, axes in delta.feature_axes().items():
                p = getattr(delta, attr)
                axis = axes.get(delta.shard.dim)
                whole = delta.shard.out_features if delta.shard.dim == "out" else delta.shard.in_features
                if axis is not None and p.shape[axis] != whole // delta.shard.world:
                    return False
    return True


# ----- scenario 3: refusals ------------------------------------------------------------------------
def refusals(path: Path, tp) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from muxtune.engine.model.loading import LoadedBackbone

    out = {}
    bb = backbone(path, None)
    bb.attach(0, PeftSpec.model_validate(TASKS[0]["peft"]), 0)
    try:
        tpar.apply_tensor_parallel(bb, tp)
    except ValueError as exc:
        out["after_attach"] = str(exc)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=1)
    odd = MultiplexedBackbone(LoadedBackbone(LlamaForCausalLM(cfg), bb.tokenizer, Path("odd-kv")))
    try:
        tpar.apply_tensor_parallel(odd, tp)
    except ValueError as exc:
        out["heads"] = str(exc)
    return out


def run_all(models: dict[str, Path], tp, single_snapshot: dict, steps: int, snapshot_at: int) -> dict:
    """Every scenario of one tp rank ("llama" is the training model)."""
    out = {f"grads_{name}": grads(path, tp) for name, path in models.items()}
    out["train"] = train(models["llama"], tp, steps, dtype=EXACT, snapshot_at=snapshot_at, count_comms=True)
    out["train_fp32"] = train(models["llama"], tp, steps)
    out["resumed_from_single"] = train(models["llama"], tp, steps, dtype=EXACT, start=single_snapshot,
                                       start_step=snapshot_at)
    out["refusals"] = refusals(models["llama"], tp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--store", required=True, help="file for torch.distributed's FileStore rendezvous")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--single-snapshot", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--snapshot-at", type=int, required=True)
    a = ap.parse_args()
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{a.store}", rank=a.rank, world_size=a.world)
    try:
        models = dict((m.split("=", 1)[0], Path(m.split("=", 1)[1])) for m in a.model)
        results = run_all(models, dist.group.WORLD, torch.load(a.single_snapshot), a.steps, a.snapshot_at)
        torch.save(results, Path(a.out) / f"rank{a.rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
