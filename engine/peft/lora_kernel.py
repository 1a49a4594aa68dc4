"""Fused multi-task LoRA for MultiplexedLinear: segmented shrink/expand in Triton (SGMV-style).

`fused_additive(xf, layout, work, out_features)` has the exact contract of
`mux_linear.segmented_additive` (install it as `MuxContext.additive_kernel`): for every
`(start, end, delta)` in `work`, the tokens `layout.perm[start:end]` get
`delta.additive(x)`; every other token gets zeros. For LoRA that is
`scale_t * (x_t @ A_t^T) @ B_t^T`, and all tasks run in a fixed number of kernel launches
whatever their number (cf. Punica's SGMV and S-LoRA):

forward
  shrink   h[p, :r_t] = x[perm[p]] @ A_t^T          grid (segment tiles, rank blocks, split-K)
  expand   out[perm[p]] = scale_t * h[p, :r_t] @ B_t^T   grid (tiles incl. gap tiles, N tiles)
backward
  shrink   dh[p, :r_t] = scale_t * dy[perm[p]] @ B_t     (same kernel, B read transposed)
  expand   dx[perm[p]] = dh[p, :r_t] @ A_t                (same kernel, A read transposed)
  grad A   dA_t = dh_t^T x_t             grid (token chunks, K tiles, rank blocks)
  grad B   dB_t = scale_t * dy_t^T h_t   grid (token chunks, N tiles, rank blocks)

Rows are read and written through the permutation (no gathered copy of x, no scatter pass),
`h`/`dh` are [T, R] fp32 buffers in permuted order. Weights are never stacked or copied: a
small per-segment table holds each task's rank, the addresses of its fp32 master `lora_A` /
`lora_B`, its scale and where its gradients go in one flat fp32 buffer; kernels cast the
weights to the activation dtype on load (exactly as `LoraDelta.additive` does with `.to`),
mask columns past the task's rank, and accumulate in fp32. Gradients for the master
parameters are returned as fp32 views of that buffer, so autograd accumulates them as usual.

Fallbacks (per item of `work`, to `segmented_additive`, which is exact by definition):
- a delta whose `additive` is not LoRA's (any other method);
- a LoRA delta with dropout > 0 while in training mode (the dropout mask is drawn from the
  task's own generator exactly as the reference does, so its RNG stream is unchanged);
- weights not contiguous, of a dtype other than the first fused task's, or on another device.
The whole call falls back when Triton cannot run (CPU tensors without TRITON_INTERPRET=1,
no Triton, a dtype other than fp32/bf16/fp16, empty input, overlapping segments).

Split-K (few tiles) and segments longer than `chunk_m` accumulate with fp32 atomics, so bits
can vary run to run; under `torch.use_deterministic_algorithms(True)` neither is used.
The kernels themselves live in lora_triton.py; this module plans and launches them.
Install with `install(backbone.ctx, device)` (CUDA only; MUXTUNE_LORA_KERNEL=0 opts out).
Correctness is tested on CPU through Triton's interpreter (tests/engine/test_lora_kernel.py)
and the kernels are compiled for sm_90 there; GPU speed: bench/lora_kernel.py.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from muxtune.engine.packing import TokenLayout
from muxtune.engine.peft.lora import LoraDelta
from muxtune.engine.peft.mux_linear import segmented_additive

from muxtune.engine.peft.lora_triton import _INTERPRET, _TL_DTYPES, tl, triton

if triton is not None:
    from muxtune.engine.peft.lora_triton import _expand_kernel, _grad_a_kernel, _grad_b_kernel, _shrink_kernel

__all__ = ["KernelConfig", "compile_check", "fused_additive", "install", "interpreting", "kernel_available"]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes. The GPU defaults are unmeasured heuristics (see bench/lora_kernel.py)."""

    block_m: int = 64  # tokens per tile
    block_n: int = 128  # output features per expand tile / per dB tile
    block_k: int = 64  # input features per shrink step / per dA tile
    block_r: int = 64  # largest rank block (the rank block is min(this, next pow2 of r_max), >= 16)
    chunk_m: int = 1024  # tokens per dA/dB reduction program (segments longer are split, atomics)
    split_k: int | None = None  # shrink split over K; None: enough programs for the device
    num_warps: int = 4
    num_stages: int = 3  # software pipelining of the K / token loops; the expand (1-2 rank steps) uses <= 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "block_r", "chunk_m"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16 (tl.dot), got {v}")


DEFAULT_CONFIG = KernelConfig()
_SEG_COLS = 5  # segment table: rank, lora_A address, lora_B address, dA offset, dB offset


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def kernel_available(device: torch.device) -> bool:
    """Whether fused_additive runs the Triton kernels (rather than falling back) on this device."""
    if triton is None:
        return False
    return device.type == "cpu" if _INTERPRET else device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# host-side plans (small int tables, cached: every layer of one forward shares the token plan,
# every step reuses the weight table)

@dataclass
class _TokenPlan:
    tables: torch.Tensor  # int32 [n_shrink + n_expand + n_chunks, 3] (segment, start, end)
    n_shrink: int
    n_expand: int
    n_chunks: int
    multi_chunk: bool  # some segment spans several reduction chunks: dA/dB accumulate atomically

    @property
    def shrink_tiles(self) -> torch.Tensor:
        return self.tables[: self.n_shrink]

    @property
    def expand_tiles(self) -> torch.Tensor:
        return self.tables[self.n_shrink: self.n_shrink + self.n_expand]

    @property
    def chunks(self) -> torch.Tensor:
        return self.tables[self.n_shrink + self.n_expand:]


@dataclass
class _SegTable:
    table: torch.Tensor  # int64 [S + 1, 5]; the last row is the rank-0 "gap" segment
    scales: torch.Tensor  # fp32 [S + 1]
    ranks: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]  # (dA offset, dB offset) per segment in the flat buffer
    grad_numel: int
    r_max: int


_CACHE_SIZE = 256
_token_plans: OrderedDict = OrderedDict()
_seg_tables: OrderedDict = OrderedDict()


def _cached(cache: OrderedDict, key, build):
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = build()
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _token_plan(bounds: tuple[tuple[int, int], ...], total: int, device, block_m: int, chunk_m: int) -> _TokenPlan:
    def build() -> _TokenPlan:
        gap = len(bounds)  # index of the rank-0 row of the segment table
        shrink, chunks, covered = [], [], []
        multi = False
        for i, (s, e) in enumerate(bounds):
            shrink.extend((i, m, min(m + block_m, e)) for m in range(s, e, block_m))
            chunks.extend((i, m, min(m + chunk_m, e)) for m in range(s, e, chunk_m))
            multi |= e - s > chunk_m
            covered.append((s, e))
        fill, cursor = [], 0
        for s, e in sorted(covered):
            fill.extend((gap, m, min(m + block_m, s)) for m in range(cursor, s, block_m))
            cursor = max(cursor, e)
        fill.extend((gap, m, min(m + block_m, total)) for m in range(cursor, total, block_m))
        rows = shrink + shrink + fill + chunks
        tables = torch.tensor(rows or [(0, 0, 0)], dtype=torch.int32).to(device)
        return _TokenPlan(tables, len(shrink), len(shrink) + len(fill), len(chunks), multi)

    return _cached(_token_plans, (bounds, total, str(device), block_m, chunk_m), build)


def _seg_table(deltas, in_features: int, out_features: int, device) -> _SegTable:
    key = (str(device), in_features, out_features,
           tuple((d.lora_A.data_ptr(), d.lora_B.data_ptr(), d.lora_A.shape[0], float(d.scaling)) for d in deltas))

    def build() -> _SegTable:
        rows, scales, offsets, cursor = [], [], [], 0
        for a_ptr, b_ptr, r, scale in key[3]:
            offsets.append((cursor, cursor + r * in_features))
            rows.append((r, a_ptr, b_ptr, cursor, cursor + r * in_features))
            scales.append(scale)
            cursor += r * (in_features + out_features)
        rows.append((0, 0, 0, 0, 0))
        scales.append(0.0)
        ranks = tuple(r for _, _, r, _ in key[3])
        return _SegTable(
            torch.tensor(rows, dtype=torch.int64).to(device), torch.tensor(scales, dtype=torch.float32).to(device),
            ranks, tuple(offsets), cursor, max(ranks),
        )

    return _cached(_seg_tables, key, build)


_sm_count: dict[int, int] = {}


def _split_k(cfg: KernelConfig, programs: int, k: int, device) -> int:
    if cfg.split_k is not None:
        return max(1, cfg.split_k)
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    want = 2 * _sm_count[idx]
    if programs >= want:
        return 1
    return max(1, min(8, math.ceil(want / max(1, programs)), triton.cdiv(k, cfg.block_k)))


@dataclass
class _Launch:
    """Everything the kernels of one call need besides the tensors."""

    plan: _TokenPlan
    segs: _SegTable
    cfg: KernelConfig
    block_r: int
    r_pad: int
    identity: bool
    io: object
    dot: object
    w_dtype: object
    precision: str
    emulate_bf16: bool
    deterministic: bool  # no atomics: no split-K, one reduction chunk per segment


def _block_r(cfg: KernelConfig, r_max: int) -> int:
    return max(16, min(triton.next_power_of_2(cfg.block_r), triton.next_power_of_2(max(r_max, 1))))


def _shrink(launch: _Launch, src: torch.Tensor, perm: torch.Tensor, w_col: int, w_trans: bool,
            apply_scale: bool) -> torch.Tensor:
    """[T, r_pad] fp32, rows in permuted order (rows outside every segment left undefined)."""
    cfg, plan, segs = launch.cfg, launch.plan, launch.segs
    total, k = src.shape
    r_blocks = launch.r_pad // launch.block_r
    split = 1 if launch.deterministic else _split_k(cfg, plan.n_shrink * r_blocks, k, src.device)
    h = (torch.zeros if split > 1 else torch.empty)(total, launch.r_pad, dtype=torch.float32, device=src.device)
    if plan.n_shrink:
        _shrink_kernel[(plan.n_shrink, r_blocks, split)](
            src, perm, h, plan.shrink_tiles, segs.table, segs.scales,
            k, src.stride(0), h.stride(0),
            W_COL=w_col, W_TRANS=w_trans, APPLY_SCALE=apply_scale, IDENTITY=launch.identity, SPLIT_K=split,
            BLOCK_M=cfg.block_m, BLOCK_R=launch.block_r, BLOCK_K=cfg.block_k,
            W_DTYPE=launch.w_dtype, IO_DTYPE=launch.io, DOT_DTYPE=launch.dot, PRECISION=launch.precision,
            EMULATE_BF16=launch.emulate_bf16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return h


def _expand_stages(cfg: KernelConfig) -> int:
    # the rank loop runs 1-2 steps: deeper pipelining only costs shared memory (114 KiB at 3
    # stages on sm_90 with the default tiles, too much for sm_86/89's 99 KiB)
    return max(1, min(cfg.num_stages, 2))


def _expand(launch: _Launch, h: torch.Tensor, perm: torch.Tensor, n: int, dtype, w_col: int, w_trans: bool,
            apply_scale: bool) -> torch.Tensor:
    """[T, n] in `dtype`, every row written (zeros outside the segments)."""
    cfg, plan, segs = launch.cfg, launch.plan, launch.segs
    out = torch.empty(h.shape[0], n, dtype=dtype, device=h.device)
    _expand_kernel[(plan.n_expand, triton.cdiv(n, cfg.block_n))](
        h, perm, out, plan.expand_tiles, segs.table, segs.scales,
        n, h.stride(0), out.stride(0),
        W_COL=w_col, W_TRANS=w_trans, APPLY_SCALE=apply_scale, IDENTITY=launch.identity,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=launch.block_r,
        W_DTYPE=launch.w_dtype, IO_DTYPE=launch.io, DOT_DTYPE=launch.dot, PRECISION=launch.precision,
        EMULATE_BF16=launch.emulate_bf16, num_warps=cfg.num_warps, num_stages=_expand_stages(cfg),
    )
    return out


class _FusedLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xf, perm, launch: _Launch, out_features: int, *weights):
        h = _shrink(launch, xf, perm, w_col=1, w_trans=False, apply_scale=False)
        out = _expand(launch, h, perm, out_features, xf.dtype, w_col=2, w_trans=False, apply_scale=True)
        # the weights are read through addresses: saving them keeps them alive and version-checked
        ctx.save_for_backward(xf, perm, h, *weights)
        ctx.launch = launch
        return out

    @staticmethod
    def backward(ctx, dout):
        xf, perm, h, *weights = ctx.saved_tensors
        launch: _Launch = ctx.launch
        cfg, plan, segs = launch.cfg, launch.plan, launch.segs
        dout = dout.to(xf.dtype)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        total, k = xf.shape
        n = dout.shape[1]
        dh = _shrink(launch, dout, perm, w_col=2, w_trans=True, apply_scale=True)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _expand(launch, dh, perm, k, xf.dtype, w_col=1, w_trans=True, apply_scale=False)
        grads = [None] * len(weights)
        if any(ctx.needs_input_grad[4:]) and plan.n_chunks:
            g = torch.zeros(segs.grad_numel, dtype=torch.float32, device=xf.device)
            r_blocks = launch.r_pad // launch.block_r
            common = dict(USE_ATOMIC=plan.multi_chunk, IDENTITY=launch.identity, BLOCK_M=cfg.block_m,
                          BLOCK_R=launch.block_r, IO_DTYPE=launch.io, DOT_DTYPE=launch.dot,
                          PRECISION=launch.precision, EMULATE_BF16=launch.emulate_bf16, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages)
            _grad_a_kernel[(plan.n_chunks, triton.cdiv(k, cfg.block_k), r_blocks)](
                dh, xf, perm, g, plan.chunks, segs.table, k, dh.stride(0), xf.stride(0),
                BLOCK_K=cfg.block_k, **common,
            )
            _grad_b_kernel[(plan.n_chunks, triton.cdiv(n, cfg.block_n), r_blocks)](
                dout, h, perm, g, plan.chunks, segs.table, segs.scales, n, dout.stride(0), h.stride(0),
                BLOCK_N=cfg.block_n, **common,
            )
            for i, (r, (off_a, off_b)) in enumerate(zip(segs.ranks, segs.offsets)):
                a, b = weights[2 * i], weights[2 * i + 1]
                if ctx.needs_input_grad[4 + 2 * i]:
                    grads[2 * i] = g[off_a: off_a + r * k].view(r, k).to(a.dtype)
                if ctx.needs_input_grad[5 + 2 * i]:
                    grads[2 * i + 1] = g[off_b: off_b + n * r].view(n, r).to(b.dtype)
        elif any(ctx.needs_input_grad[4:]):  # every segment empty
            grads = [torch.zeros_like(w) for w in weights]
        return (dx, None, None, None, *grads)


def _fusable(delta, xf: torch.Tensor, w_dtype) -> bool:
    if not isinstance(delta, LoraDelta) or type(delta).additive is not LoraDelta.additive:
        return False
    if delta.dropout and delta.training:
        return False
    a, b = delta.lora_A, delta.lora_B
    return (a.device == xf.device and b.device == xf.device and a.dtype == b.dtype
            and a.dtype in _TL_DTYPES and (w_dtype is None or a.dtype == w_dtype)
            and a.is_contiguous() and b.is_contiguous() and a.shape[0] > 0
            and a.shape[1] == xf.shape[1] and b.shape[1] == a.shape[0])


def fused_additive(xf: torch.Tensor, layout: TokenLayout, work, out_features: int,
                   config: KernelConfig | None = None) -> torch.Tensor:
    """Drop-in for `segmented_additive` (same arguments, same result) running LoRA deltas fused.

    Items that cannot be fused (non-LoRA deltas, LoRA with dropout > 0 in training mode, odd
    weight dtypes/devices) go through `segmented_additive` and are added on top; see the module
    docstring for the whole-call fallbacks.
    """
    if (triton is None or not kernel_available(xf.device) or xf.dtype not in _TL_DTYPES or xf.dim() != 2
            or xf.shape[0] == 0 or xf.shape[1] == 0 or out_features == 0):
        return segmented_additive(xf, layout, work, out_features)
    fused, other, w_dtype = [], [], None
    for item in work:
        if _fusable(item[2], xf, w_dtype):
            fused.append(item)
            w_dtype = item[2].lora_A.dtype
        else:
            other.append(item)
    bounds = tuple((int(s), int(e)) for s, e, _ in fused)
    ordered = sorted(bounds)
    total = xf.shape[0]
    if not fused or any(s < 0 or e < s or e > total for s, e in bounds) or any(
            ordered[i][0] < ordered[i - 1][1] for i in range(1, len(ordered))):
        return segmented_additive(xf, layout, work, out_features)
    if any(d.lora_B.shape[0] != out_features for _, _, d in fused):
        raise ValueError(f"lora_B has {fused[0][2].lora_B.shape[0]} rows, the layer {out_features} outputs")
    cfg = config or DEFAULT_CONFIG
    if xf.stride(1) != 1:
        xf = xf.contiguous()
    deltas = [d for _, _, d in fused]
    segs = _seg_table(deltas, xf.shape[1], out_features, xf.device)
    # torch.use_deterministic_algorithms(True): no fp32 atomics (their order varies run to run)
    deterministic = torch.are_deterministic_algorithms_enabled()
    chunk = max(total, cfg.block_m) if deterministic else max(cfg.chunk_m, cfg.block_m)
    plan = _token_plan(bounds, total, xf.device, cfg.block_m, chunk)
    block_r = _block_r(cfg, segs.r_max)
    io = _TL_DTYPES[xf.dtype]
    emulate = _INTERPRET and xf.dtype == torch.bfloat16  # see _as_operand
    dot = tl.float32 if emulate else io
    precision = "tf32" if (xf.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32) else "ieee"
    r_pad = triton.cdiv(segs.r_max, block_r) * block_r
    launch = _Launch(plan, segs, cfg, block_r, r_pad, bool(layout.identity), io, dot, _TL_DTYPES[w_dtype],
                     precision, emulate, deterministic)
    perm = layout.perm
    if perm.device != xf.device:
        perm = perm.to(xf.device)
    weights = [w for d in deltas for w in (d.lora_A, d.lora_B)]
    if xf.is_cuda:
        with torch.cuda.device(xf.device):
            add = _FusedLora.apply(xf, perm, launch, out_features, *weights)
    else:
        add = _FusedLora.apply(xf, perm, launch, out_features, *weights)
    if other:
        add = add + segmented_additive(xf, layout, other, out_features)
    return add


def install(ctx, device: torch.device, config: KernelConfig | None = None) -> bool:
    """Make `ctx` (a MuxContext) run additive deltas through fused_additive when the kernels can
    run on `device`; MUXTUNE_LORA_KERNEL=0 keeps the reference loop. Returns whether installed."""
    import functools
    import os

    if os.environ.get("MUXTUNE_LORA_KERNEL", "1") == "0" or not kernel_available(torch.device(device)):
        return False
    ctx.additive_kernel = fused_additive if config is None else functools.partial(fused_additive, config=config)
    return True


def compile_check(arch: int = 90, dtype: torch.dtype = torch.bfloat16, config: KernelConfig | None = None,
                  r_max: int = 64, variants: str = "all") -> dict[str, int]:
    """Compile the kernels ahead of time for CUDA sm_<arch> (no GPU needed: Triton's bundled
    ptxas) with the specialisations fused_additive launches; returns shared memory bytes per
    kernel. Catches what the CPU interpreter cannot (lowering, types, resources at compile time).
    variants="main" compiles one specialisation per kernel (forward shrink/expand, dA, dB)."""
    from triton.backends.compiler import GPUTarget

    if triton is None:
        raise RuntimeError("triton is not installed")
    cfg = config or DEFAULT_CONFIG
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    io = _TL_DTYPES[dtype]
    xs = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    precision = "ieee" if dtype == torch.float32 else "tf32"
    block_r = _block_r(cfg, r_max)
    common = dict(IO_DTYPE=io, DOT_DTYPE=io, PRECISION=precision, EMULATE_BF16=False)
    shrink_sig = dict(x_ptr=xs, perm_ptr="*i64", h_ptr="*fp32", tiles_ptr="*i32", seg_ptr="*i64", scale_ptr="*fp32",
                      K="i32", stride_x="i32", stride_h="i32")
    expand_sig = dict(h_ptr="*fp32", perm_ptr="*i64", out_ptr=xs, tiles_ptr="*i32", seg_ptr="*i64",
                      scale_ptr="*fp32", N="i32", stride_h="i32", stride_out="i32")
    ga_sig = dict(dh_ptr="*fp32", x_ptr=xs, perm_ptr="*i64", g_ptr="*fp32", chunks_ptr="*i32", seg_ptr="*i64",
                  K="i32", stride_dh="i32", stride_x="i32")
    gb_sig = dict(dy_ptr=xs, h_ptr="*fp32", perm_ptr="*i64", g_ptr="*fp32", chunks_ptr="*i32", seg_ptr="*i64",
                  scale_ptr="*fp32", N="i32", stride_dy="i32", stride_h="i32")
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_R=block_r)
    jobs = [
        ("shrink x@A^T", _shrink_kernel, shrink_sig, cfg.num_stages,
         dict(W_COL=1, W_TRANS=False, APPLY_SCALE=False, IDENTITY=False, SPLIT_K=1, BLOCK_K=cfg.block_k,
              W_DTYPE=tl.float32, **tiles, **common)),
        ("expand h@B^T", _expand_kernel, expand_sig, _expand_stages(cfg),
         dict(W_COL=2, W_TRANS=False, APPLY_SCALE=True, IDENTITY=False, BLOCK_N=cfg.block_n,
              W_DTYPE=tl.float32, **tiles, **common)),
        ("grad A", _grad_a_kernel, ga_sig, cfg.num_stages,
         dict(USE_ATOMIC=True, IDENTITY=False, BLOCK_K=cfg.block_k, **tiles, **common)),
        ("grad B", _grad_b_kernel, gb_sig, cfg.num_stages,
         dict(USE_ATOMIC=True, IDENTITY=False, BLOCK_N=cfg.block_n, **tiles, **common)),
    ]
    if variants == "all":
        jobs += [
            ("shrink dy@B (split-K, identity)", _shrink_kernel, shrink_sig, cfg.num_stages,
             dict(W_COL=2, W_TRANS=True, APPLY_SCALE=True, IDENTITY=True, SPLIT_K=4, BLOCK_K=cfg.block_k,
                  W_DTYPE=tl.float32, **tiles, **common)),
            ("expand dh@A (identity)", _expand_kernel, expand_sig, _expand_stages(cfg),
             dict(W_COL=1, W_TRANS=True, APPLY_SCALE=False, IDENTITY=True, BLOCK_N=cfg.block_n,
                  W_DTYPE=tl.float32, **tiles, **common)),
            ("grad A (store)", _grad_a_kernel, ga_sig, cfg.num_stages,
             dict(USE_ATOMIC=False, IDENTITY=True, BLOCK_K=cfg.block_k, **tiles, **common)),
            ("grad B (store)", _grad_b_kernel, gb_sig, cfg.num_stages,
             dict(USE_ATOMIC=False, IDENTITY=True, BLOCK_N=cfg.block_n, **tiles, **common)),
        ]
    out = {}
    for name, fn, sig, stages, consts in jobs:
        signature = {a: ("constexpr" if a in consts else sig[a]) for a in fn.arg_names}
        src = triton.compiler.ASTSource(fn=fn, constexprs=consts, signature=signature, attrs={})
        options = backend.parse_options({"num_warps": cfg.num_warps, "num_stages": stages})
        out[name] = triton.compile(src, target=target, options=options.__dict__).metadata.shared
    return out
