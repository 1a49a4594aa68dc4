"""The fused multi-task LoRA kernel (engine/peft/lora_kernel.py) equals the reference loop.

The Triton kernels run here in Triton's CPU interpreter. TRITON_INTERPRET=1 must be set before
triton is imported, so every kernel check runs in ONE subprocess (this file run as a script,
inheriting MUXTUNE_HOME from the session fixture) that reports per-case errors as JSON; the
tests below assert on them. Errors are relative: max |fused - ref| / max |ref|.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from muxtune.engine.peft.base import TaskDelta

from tests.helpers.paths import REPO

SELF = "tests.engine.kernels.test_lora_kernel"  # also run as a script (python -m, from REPO): see the end


# relative tolerances per input dtype (the reference itself rounds every product to the dtype)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
# bf16/fp16: the fused result (fp32 accumulation) may be at most this much further from an fp64
# truth than the reference is
TRUTH_SLACK = 1.25
# small tiles so that tiny shapes still span several tiles, rank blocks and reduction chunks
SMALL = dict(block_m=16, block_n=32, block_k=32, block_r=16, chunk_m=32)
# whole-model checks: the interpreter costs about the same per program whatever the tile, so
# few large tiles keep them fast (the tile logic itself is covered by the SMALL cases)
LARGE = dict(block_m=128, block_n=512, block_k=128, block_r=16, chunk_m=128)


# ---------------------------------------------------------------------------------------------
# checks, run inside the interpreter subprocess

CASES: dict[str, object] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the statistic for distances to a truth (max-error ratios are noisy)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _deltas(ranks: dict[int, int], k: int, n: int, seed: int = 0, dropout: float = 0.0):
    from muxtune.api.finetunetask import PeftSpec
    from muxtune.engine.peft.lora import LoraDelta

    base = torch.nn.Linear(k, n)
    out = {}
    for slot, r in ranks.items():
        g = torch.Generator().manual_seed(seed + slot)
        d = LoraDelta(base, PeftSpec(r=r, alpha=2 * r, dropout=dropout), g)
        with torch.no_grad():  # B starts at zero in LoRA: make the forward and dA non-trivial
            d.lora_B.normal_(generator=g)
        out[slot] = d
    return out


def _rng_snapshot(deltas):
    """A function that puts the deltas' random state (dropout) back to what it is now.

    Generic over how a delta keeps it: every torch.Generator attribute gets its state back, and
    attributes that are None now (a generator created lazily on first use) become None again."""
    saved = []
    for d in deltas:
        for name, value in vars(d).items():
            if isinstance(value, torch.Generator):
                saved.append((d, name, value, value.get_state()))
            elif value is None:
                saved.append((d, name, None, None))

    def restore():
        for d, name, gen, state in saved:
            if gen is None:
                setattr(d, name, None)
            else:
                gen.set_state(state)
                setattr(d, name, gen)

    return restore


def _shuffled_slots(counts: list[tuple[int, int]], seed: int) -> torch.Tensor:
    slots = torch.cat([torch.full((c,), s) for s, c in counts])
    return slots[torch.randperm(len(slots), generator=torch.Generator().manual_seed(seed))]


def _run(fn, x, layout, work, n, deltas, seed=1):
    for d in deltas:
        d.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, layout, work, n)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(gy)
    grads = [(None if p.grad is None else p.grad.clone()) for d in deltas for p in d.parameters()]
    return out.detach(), x.grad, grads


def _compare(x, layout, work, n, cfg=None, label=""):
    """Errors of fused_additive against segmented_additive, forward and every gradient."""
    from muxtune.engine.peft import lora_kernel as lk
    from muxtune.engine.peft.mux_linear import segmented_additive

    deltas = list(dict.fromkeys(d for _, _, d in work))
    fused = functools.partial(lk.fused_additive, config=lk.KernelConfig(**(cfg or SMALL)))
    ref = _run(segmented_additive, x, layout, work, n, deltas)
    got = _run(fused, x, layout, work, n, deltas)
    tol = TOL[x.dtype]
    rows = [(f"{label}out", _rel(got[0], ref[0]), tol), (f"{label}dx", _rel(got[1], ref[1]), tol)]
    assert got[0].dtype == ref[0].dtype == x.dtype
    for i, (g, r) in enumerate(zip(got[2], ref[2])):
        name = f"{label}{'AB'[i % 2]}{i // 2}"
        if r is None or not r.abs().max() > 0:
            rows.append((name + "=ref(0)", 0.0 if (g is None or not g.abs().max() > 0) else 1.0, 0.0))
        else:
            assert g.dtype == torch.float32
            rows.append((name, _rel(g, r), tol))
    return rows, ref, got


def _truth(x, layout, work, n, seed=1):
    """fp64 forward/backward on the same (rounded) inputs and the fp32 master weights."""
    from muxtune.engine.peft.mux_linear import segmented_additive

    deltas = list(dict.fromkeys(d for _, _, d in work))
    for d in deltas:
        d.double()
    try:
        out, dx, grads = _run(segmented_additive, x.double(), layout, work, n, deltas, seed)
    finally:
        for d in deltas:
            d.float()
    return out, dx, grads


def _mixed_layout():
    from muxtune.engine.packing import TokenLayout

    # slots 0..3 have LoRA (ranks 2, 8, 16, 20), slot 5 has no delta at this layer, -1 is padding;
    # uneven lengths, shuffled (a non-identity permutation)
    slots = _shuffled_slots([(1, 40), (0, 7), (-1, 5), (3, 25), (2, 41), (5, 9)], seed=0)
    return TokenLayout.from_slots(slots)


def _mixed(dtype, cfg=None, k=48, n=40):
    layout = _mixed_layout()
    deltas = _deltas({0: 2, 1: 8, 2: 16, 3: 20}, k, n)
    work = [(s, e, deltas[slot]) for slot, s, e in layout.segments if slot in deltas]
    x = torch.randn(len(layout.perm), k, generator=torch.Generator().manual_seed(3)).to(dtype)
    return x, layout, work, n


@case
def fp32_mixed_ranks():
    assert not _mixed_layout().identity
    return _compare(*_mixed(torch.float32))[0]


@case
def fp32_default_tiles():
    """The GPU tile sizes (one tile per segment, one rank block, split-K 1)."""
    from muxtune.engine.peft.lora_kernel import KernelConfig

    return _compare(*_mixed(torch.float32), cfg={f: getattr(KernelConfig(), f) for f in SMALL})[0]


@case
def fp32_split_k():
    """Shrink split over K (atomic fp32 adds into h / dh)."""
    return _compare(*_mixed(torch.float32, k=100), cfg={**SMALL, "split_k": 3})[0]


def _low_precision(dtype):
    x, layout, work, n = _mixed(dtype)
    rows, ref, got = _compare(x, layout, work, n)
    truth = _truth(x, layout, work, n)
    pairs = [("out", got[0], ref[0], truth[0]), ("dx", got[1], ref[1], truth[1])]
    pairs += [(f"{'AB'[i % 2]}{i // 2}", g, r, t) for i, (g, r, t) in enumerate(zip(got[2], ref[2], truth[2]))]
    for name, g, r, t in pairs:
        rows.append((f"{name}: fused-vs-fp64 / ref-vs-fp64", _ratio(_rel_norm(g, t), _rel_norm(r, t)), TRUTH_SLACK))
    return rows


@case
def bf16_mixed_ranks():
    return _low_precision(torch.bfloat16)


@case
def fp16_mixed_ranks():
    return _low_precision(torch.float16)


@case
def identity_layout():
    """Tokens already grouped (the IDENTITY path: no index loads), segments longer than a chunk."""
    from muxtune.engine.packing import TokenLayout

    slots = torch.cat([torch.full((c,), s) for s, c in [(0, 70), (1, 3), (2, 45)]])
    layout = TokenLayout.from_slots(slots)
    assert layout.identity
    deltas = _deltas({0: 16, 1: 2, 2: 8}, 40, 24)
    work = [(s, e, deltas[slot]) for slot, s, e in layout.segments]
    x = torch.randn(len(slots), 40, generator=torch.Generator().manual_seed(4))
    return _compare(x, layout, work, 24)[0]


@case
def deterministic_mode():
    """torch.use_deterministic_algorithms(True): no split-K and one reduction chunk per segment
    (plain stores, no atomics), same results."""
    from muxtune.engine.peft import lora_kernel as lk
    launches = []
    real = lk._FusedLora.apply
    lk._FusedLora.apply = lambda *a: launches.append(a[2]) or real(*a)
    torch.use_deterministic_algorithms(True)
    try:
        rows = _compare(*_mixed(torch.float32, k=100), cfg={**SMALL, "split_k": 3})[0]
    finally:
        torch.use_deterministic_algorithms(False)
        lk._FusedLora.apply = real
    (launch,) = launches
    rows.append(("deterministic launch without atomics",
                 float(not launch.deterministic or launch.plan.multi_chunk), 0.0))
    return rows


@case
def empty_segments():
    """Hand-made work with empty segments (grads are zeros) and gaps at both ends."""
    from muxtune.engine.packing import TokenLayout

    slots = _shuffled_slots([(0, 30), (1, 20), (2, 15), (-1, 6)], seed=5)
    layout = TokenLayout.from_slots(slots)
    deltas = _deltas({0: 8, 1: 2, 2: 16, 7: 4}, 32, 48)
    segs = {slot: (s, e) for slot, s, e in layout.segments}
    s1, e1 = segs[1]
    work = [(s1, s1, deltas[7]), (s1, e1, deltas[1]), (e1, e1, deltas[0]), (segs[2][0], segs[2][1], deltas[2])]
    x = torch.randn(len(slots), 32, generator=torch.Generator().manual_seed(6))
    rows, ref, got = _compare(x, layout, work, 48)
    rows.append(("empty segment: A grad is zeros", float(got[2][0].abs().max()), 0.0))
    rows.append(("empty segment: B grad is zeros", float(got[2][1].abs().max()), 0.0))
    return rows


class ShiftDelta(TaskDelta):
    """A non-LoRA additive delta: adds a learned vector (goes through the reference path)."""

    method = "shift"

    def __init__(self, n):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.linspace(-1, 1, n))

    def additive(self, x):
        return x[:, :1] * self.bias.to(x.dtype)


@case
def fallbacks_mixed_in():
    """A non-LoRA delta and a LoRA with dropout in training mode run on the reference path,
    drawing the dropout mask from the task's own random state exactly as the reference does."""
    from muxtune.engine.peft import lora_kernel as lk
    from muxtune.engine.peft.mux_linear import segmented_additive

    x, layout, work, n = _mixed(torch.float32)
    drop = _deltas({9: 4}, x.shape[1], n, dropout=0.25)[9]
    shift = ShiftDelta(n)
    work = [(s, e, shift if i == 1 else drop if i == 2 else d) for i, (s, e, d) in enumerate(work)]
    deltas = [d for _, _, d in work]
    restore_rng = _rng_snapshot([drop])
    ref = _run(segmented_additive, x, layout, work, n, deltas)
    restore_rng()
    calls = []
    real = lk._FusedLora.apply
    lk._FusedLora.apply = lambda *a: calls.append(len(a) - 4) or real(*a)
    try:
        got = _run(functools.partial(lk.fused_additive, config=lk.KernelConfig(**SMALL)), x, layout, work, n, deltas)
    finally:
        lk._FusedLora.apply = real
    rows = [("kernel ran once for the 2 fusable tasks", float(calls != [4]), 0.0),
            ("out", _rel(got[0], ref[0]), 1e-5), ("dx", _rel(got[1], ref[1]), 1e-5)]
    rows += [(f"grad {i}", _rel(g, r), 1e-5) for i, (g, r) in enumerate(zip(got[2], ref[2])) if r is not None]
    # eval mode: dropout is off, the same task is fused
    drop.eval()
    calls.clear()
    lk._FusedLora.apply = lambda *a: calls.append(len(a) - 4) or real(*a)
    try:
        with torch.no_grad():
            lk.fused_additive(x, layout, work, n, config=lk.KernelConfig(**SMALL))
    finally:
        lk._FusedLora.apply = real
    rows.append(("dropout task fused in eval mode", float(calls != [6]), 0.0))
    return rows


@case
def no_grad_frozen_and_constant_input():
    """Under no_grad only the forward runs; with x constant and A frozen only B gets gradients."""
    from muxtune.engine.peft import lora_kernel as lk
    from muxtune.engine.peft.mux_linear import segmented_additive

    x, layout, work, n = _mixed(torch.float32)
    cfg = lk.KernelConfig(**SMALL)
    with torch.no_grad():
        rows = [("no_grad out", _rel(lk.fused_additive(x, layout, work, n, config=cfg),
                                     segmented_additive(x, layout, work, n)), 1e-5)]
    deltas = [d for _, _, d in work]
    for d in deltas:
        d.lora_A.requires_grad_(False)
    try:
        res = []
        for fn in (segmented_additive, functools.partial(lk.fused_additive, config=cfg)):
            for d in deltas:
                d.zero_grad(set_to_none=True)
            fn(x, layout, work, n).square().sum().backward()
            res.append([d.lora_B.grad.clone() for d in deltas])
            rows.append(("A grad stays None", float(any(d.lora_A.grad is not None for d in deltas)), 0.0))
    finally:
        for d in deltas:
            d.lora_A.requires_grad_(True)
    rows += [(f"B{i}", _rel(g, r), 1e-5) for i, (g, r) in enumerate(zip(res[1], res[0]))]
    return rows


def _ratio(err_fused: float, err_ref: float) -> float:
    """How much further from the truth the fused result is than the reference (<= 1: not further)."""
    if err_fused <= err_ref:
        return 0.0 if err_ref == 0 else err_fused / err_ref
    return err_fused / err_ref if err_ref > 0 else float("inf")


def _backbone_rows(dtype, quantization="none"):
    """A whole MultiplexedBackbone forward/backward with the kernel installed vs not (over a
    4-bit base too: QLoRA's base op is bitsandbytes', the deltas the kernel's)."""
    import random

    from muxtune.api.finetunetask import PeftSpec
    from muxtune.engine.peft import lora_kernel as lk
    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.data.dataset import IGNORE, Example
    from muxtune.engine.model.loading import builtin_path, load_backbone
    from muxtune.engine.packing import PackedSequence, pack

    bb = MultiplexedBackbone(load_backbone(builtin_path("tiny-llama"), torch.device("cpu"), dtype,
                                           quantization=quantization))
    specs = [
        PeftSpec(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
        PeftSpec(r=8, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
        PeftSpec(method="ia3", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        PeftSpec(r=16, alpha=16, target_modules=["v_proj", "up_proj"]),
        PeftSpec(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "up_proj"]),  # reference path
    ]
    for slot, spec in enumerate(specs):
        bb.attach(slot, spec, seed=100 + slot)
    params = [p for slot in sorted(bb.adapters) for p in bb.adapters[slot].parameters()]
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in params:  # move off the init (B = 0, IA3 = 1) so every path carries signal
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    rng = random.Random(0)
    seqs = []
    for slot in range(len(specs)):
        for _ in range(1 + slot % 2):
            ids = tuple(rng.randrange(3, 259) for _ in range(rng.randint(5, 40)))
            seqs.append(PackedSequence(slot, Example(ids, ids[1:] + (IGNORE,))))
    batch = pack(seqs, chunk_size=64, device=torch.device("cpu"))
    assert not batch.layout.identity
    bb.model.train()
    restore_rng = _rng_snapshot([d for a in bb.adapters.values() for d in a.deltas.values()])

    def step(kernel):
        bb.ctx.additive_kernel = kernel
        restore_rng()
        for p in params:
            p.grad = None
        res = bb.forward_loss(batch)
        (res.task_loss_sum / res.task_tokens).sum().backward()
        bb.ctx.additive_kernel = None
        return [res.task_loss_sum.detach()] + [p.grad.clone() for p in params]

    names = ["per-task loss"] + [f"grad {i} {tuple(p.shape)}" for i, p in enumerate(params)]
    ref = step(None)
    got = step(functools.partial(lk.fused_additive, config=lk.KernelConfig(**LARGE)))
    if dtype == torch.float32:
        return [(n, _rel(g, r), TOL[dtype]) for n, g, r in zip(names, got, ref)]
    # bf16: both differ from each other by bf16 rounding carried through 4 layers; the fused
    # run must be no further from an fp32 run of the same (bf16-valued) weights than the reference
    bb.model.float()
    truth = step(None)
    ratios = [_ratio(_rel_norm(g, t), _rel_norm(r, t)) for g, r, t in zip(got, ref, truth)]
    geomean = math.exp(sum(math.log(max(x, 1e-30)) for x in ratios) / len(ratios))
    return [(f"{n}: fused-vs-fp32 / ref-vs-fp32", x, TRUTH_SLACK) for n, x in zip(names, ratios)] + [
        ("geometric mean of those ratios", geomean, 1.05)] + [
        (f"{n} vs ref", _rel(g, r), TOL[dtype]) for n, g, r in zip(names, got, ref)]


@case
def backbone_fp32():
    return _backbone_rows(torch.float32)


if importlib.util.find_spec("bitsandbytes") is not None:
    @case
    def backbone_nf4():
        return _backbone_rows(torch.float32, quantization="nf4")


@case
def backbone_bf16():
    return _backbone_rows(torch.bfloat16)


def _interp_main(out_path: str, names: list[str]) -> None:
    from muxtune.engine.peft import lora_kernel as lk
    assert lk.interpreting(), "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    results = {}
    for name in names or list(CASES):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            rows, error = CASES[name](), None
        except Exception:
            rows, error = [], traceback.format_exc()
        results[name] = {"rows": rows, "error": error, "seconds": round(time.perf_counter() - t0, 2),
                         "cpu_seconds": round(time.process_time() - c0, 2)}
        for label, value, limit in rows:
            print(f"{name:36s} {label:48s} {value:10.3g}  (limit {limit:g})", flush=True)
        if error:
            print(f"{name}: {error}", flush=True)
    Path(out_path).write_text(json.dumps(results))


COMPILE_ARCH = 90  # H100


def _compile_main(out_path: str) -> None:
    """Ahead-of-time compile for sm_90 (no GPU needed): what the interpreter cannot check."""
    from muxtune.engine.peft import lora_kernel as lk
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(COMPILE_ARCH)
    except Exception as exc:  # no CUDA backend / ptxas in this Triton build
        Path(out_path).write_text(json.dumps({"skipped": f"cannot compile for CUDA here: {exc!r}"}))
        return
    shared = lk.compile_check(COMPILE_ARCH, torch.bfloat16)
    Path(out_path).write_text(json.dumps({"shared": shared}))


# ---------------------------------------------------------------------------------------------
# the tests

BACKBONE_CASES = [n for n in ("backbone_fp32", "backbone_bf16", "backbone_nf4") if n in CASES]


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory, tiny_backbone_dir):
    """Three subprocesses at once: kernel cases and model cases in the interpreter, and the
    sm_90 compile; the tests below read their JSON reports."""
    tmp = tmp_path_factory.mktemp("lora-kernel")
    interp_env = {**os.environ, "TRITON_INTERPRET": "1"}
    compile_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    compile_env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    unit = [n for n in CASES if n not in BACKBONE_CASES]
    jobs = {
        "unit": (["--interp", str(tmp / "unit.json"), *unit], interp_env),
        "backbone": (["--interp", str(tmp / "backbone.json"), *BACKBONE_CASES], interp_env),
        "compile": (["--compile", str(tmp / "compile.json")], compile_env),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", SELF, *argv], env=env, cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, (argv, env) in jobs.items()}
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        path = Path(jobs[name][0][1])
        assert proc.returncode == 0 and path.exists(), f"{name} subprocess failed:\n{out[-6000:]}"
        results[name] = json.loads(path.read_text())
    return {"interp": {**results["unit"], **results["backbone"]}, "compile": results["compile"]}


@pytest.mark.slow  # three subprocesses side by side, in Triton's interpreter: minutes on two cores
@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_matches_reference(subprocess_results, name):
    res = subprocess_results["interp"][name]
    assert res["error"] is None, res["error"]
    assert res["rows"], "the case checked nothing"
    bad = [(label, value, limit) for label, value, limit in res["rows"] if not value <= limit]
    assert not bad, bad


@pytest.mark.slow  # shares the subprocesses above
def test_kernels_compile_for_sm90(subprocess_results):
    res = subprocess_results["compile"]
    if "skipped" in res:
        pytest.skip(res["skipped"])
    assert len(res["shared"]) == 8
    # fits with room to spare in every sm_80+ part's shared memory (99 KiB on sm_86/89)
    assert max(res["shared"].values()) <= 96 * 1024, res["shared"]


def test_cpu_without_interpreter_is_the_reference():
    from muxtune.engine.peft import lora_kernel as lk
    from muxtune.engine.peft.mux_linear import segmented_additive

    if lk.interpreting():
        pytest.skip("TRITON_INTERPRET=1 in this process")
    assert not lk.kernel_available(torch.device("cpu"))
    x, layout, work, n = _mixed(torch.float32)
    assert torch.equal(lk.fused_additive(x, layout, work, n), segmented_additive(x, layout, work, n))


def test_install_only_where_the_kernels_run(monkeypatch):
    from muxtune.engine.peft import lora_kernel as lk
    from muxtune.engine.peft.mux_linear import MuxContext

    ctx = MuxContext()
    if not lk.interpreting():
        assert not lk.install(ctx, torch.device("cpu")) and ctx.additive_kernel is None
    monkeypatch.setenv("MUXTUNE_LORA_KERNEL", "0")
    assert not lk.install(ctx, torch.device("cuda")) and ctx.additive_kernel is None


def test_config_rejects_tiles_tl_dot_cannot_use():
    from muxtune.engine.peft.lora_kernel import KernelConfig

    with pytest.raises(ValueError, match="block_r"):
        KernelConfig(block_r=8)
    with pytest.raises(ValueError, match="block_m"):
        KernelConfig(block_m=48)


def test_benchmark_refuses_cpu_only_machine():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, "-m", "bench.lora_kernel", "--json", os.devnull], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--interp":
        _interp_main(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 3 and sys.argv[1] == "--compile":
        _compile_main(sys.argv[2])
    else:
        sys.exit("usage: TRITON_INTERPRET=1 python -m tests.engine.kernels.test_lora_kernel --interp OUT.json [CASE...]\n"
                 "       python -m tests.engine.kernels.test_lora_kernel --compile OUT.json")
