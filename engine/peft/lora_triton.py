"""The Triton kernels of the fused multi-task LoRA (see lora_kernel.py for the contract, the
launch grids and the host-side plans). Imported once; TRITON_INTERPRET=1 at import runs them on CPU."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch builds
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _rne_bf16(v):
        """fp32 -> the nearest bf16 value (ties to even), still as fp32, by bit arithmetic."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _as_operand(v, IO_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """v (fp32 weights or h) rounded to the activation dtype, as a tl.dot operand.

        On a GPU this is `.to(IO_DTYPE)` (round to nearest even). Triton's CPU interpreter
        truncates fp32 -> bf16 and multiplies bf16 as raw integers in tl.dot, so there
        (EMULATE_BF16) the same rounding is done with bit arithmetic and the dot runs in fp32:
        the interpreter computes what the GPU computes.
        """
        if EMULATE_BF16:
            return _rne_bf16(v.to(tl.float32))
        else:
            return v.to(IO_DTYPE).to(DOT_DTYPE)

    @triton.jit
    def _as_io(v, IO_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """fp32 accumulator -> activation dtype for the store (see _as_operand)."""
        if EMULATE_BF16:
            return _rne_bf16(v).to(IO_DTYPE)
        else:
            return v.to(IO_DTYPE)

    @triton.jit
    def _shrink_kernel(
        x_ptr, perm_ptr, h_ptr, tiles_ptr, seg_ptr, scale_ptr,
        K, stride_x, stride_h,
        W_COL: tl.constexpr,  # segment-table column of the weight address
        W_TRANS: tl.constexpr,  # False: W[j, k] = w[j*K + k] (lora_A); True: w[k*rank + j] (lora_B)
        APPLY_SCALE: tl.constexpr, IDENTITY: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        W_DTYPE: tl.constexpr, IO_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
    ):
        """h[p, r0:r0+BR] (+)= x[perm[p], k-slice] @ W_seg[r0:r0+BR, k-slice]^T for one tile."""
        tile = tl.program_id(0)
        r0 = tl.program_id(1) * BLOCK_R
        split = tl.program_id(2)
        seg = tl.load(tiles_ptr + tile * 3)
        m0 = tl.load(tiles_ptr + tile * 3 + 1)
        m1 = tl.load(tiles_ptr + tile * 3 + 2)
        rank = tl.load(seg_ptr + seg * 5)
        if r0 < rank:
            w = tl.load(seg_ptr + seg * 5 + W_COL).to(tl.pointer_type(W_DTYPE))
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < m1
            if IDENTITY:
                rows = offs_m.to(tl.int64)
            else:
                rows = tl.load(perm_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            offs_k = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(split * BLOCK_K, K, BLOCK_K * SPLIT_K):
                kk = k0 + offs_k
                k_ok = kk < K
                xt = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :],
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if W_TRANS:
                    wp = w + kk[:, None].to(tl.int64) * rank + offs_r[None, :]
                else:
                    wp = w + offs_r[None, :].to(tl.int64) * K + kk[:, None]
                wt = tl.load(wp, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                wt = _as_operand(wt, IO_DTYPE, DOT_DTYPE, EMULATE_BF16)
                acc = tl.dot(xt.to(DOT_DTYPE), wt, acc, input_precision=PRECISION)
            if APPLY_SCALE:
                acc = acc * tl.load(scale_ptr + seg)
            hp = h_ptr + offs_m[:, None].to(tl.int64) * stride_h + offs_r[None, :]
            mask = row_ok[:, None] & r_ok[None, :]
            if SPLIT_K == 1:
                tl.store(hp, acc, mask=mask)
            else:
                tl.atomic_add(hp, acc, mask=mask)

    @triton.jit
    def _expand_kernel(
        h_ptr, perm_ptr, out_ptr, tiles_ptr, seg_ptr, scale_ptr,
        N, stride_h, stride_out,
        W_COL: tl.constexpr,
        W_TRANS: tl.constexpr,  # False: W[n, j] = w[n*rank + j] (lora_B); True: w[j*N + n] (lora_A)
        APPLY_SCALE: tl.constexpr, IDENTITY: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        W_DTYPE: tl.constexpr, IO_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
    ):
        """out[perm[p], n-tile] = (scale *) h[p, :rank] @ W_seg[n-tile, :rank]^T; gap tiles (rank 0) store zeros."""
        tile = tl.program_id(0)
        n0 = tl.program_id(1) * BLOCK_N
        seg = tl.load(tiles_ptr + tile * 3)
        m0 = tl.load(tiles_ptr + tile * 3 + 1)
        m1 = tl.load(tiles_ptr + tile * 3 + 2)
        rank = tl.load(seg_ptr + seg * 5)
        w = tl.load(seg_ptr + seg * 5 + W_COL).to(tl.pointer_type(W_DTYPE))
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < m1
        if IDENTITY:
            rows = offs_m.to(tl.int64)
        else:
            rows = tl.load(perm_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            ht = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * stride_h + offs_r[None, :],
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            if W_TRANS:
                wp = w + offs_r[:, None].to(tl.int64) * N + offs_n[None, :]
            else:
                wp = w + offs_n[None, :].to(tl.int64) * rank + offs_r[:, None]
            wt = tl.load(wp, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            ht = _as_operand(ht, IO_DTYPE, DOT_DTYPE, EMULATE_BF16)
            wt = _as_operand(wt, IO_DTYPE, DOT_DTYPE, EMULATE_BF16)
            acc = tl.dot(ht, wt, acc, input_precision=PRECISION)
        if APPLY_SCALE:
            acc = acc * tl.load(scale_ptr + seg)
        tl.store(out_ptr + rows[:, None] * stride_out + offs_n[None, :], _as_io(acc, IO_DTYPE, EMULATE_BF16),
                 mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _grad_a_kernel(
        dh_ptr, x_ptr, perm_ptr, g_ptr, chunks_ptr, seg_ptr,
        K, stride_dh, stride_x,
        USE_ATOMIC: tl.constexpr, IDENTITY: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        IO_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        """dA_seg[r-block, k-tile] (+)= dh[chunk, r-block]^T @ x[perm[chunk], k-tile]."""
        chunk = tl.program_id(0)
        k0 = tl.program_id(1) * BLOCK_K
        r0 = tl.program_id(2) * BLOCK_R
        seg = tl.load(chunks_ptr + chunk * 3)
        m0 = tl.load(chunks_ptr + chunk * 3 + 1)
        m1 = tl.load(chunks_ptr + chunk * 3 + 2)
        rank = tl.load(seg_ptr + seg * 5)
        if r0 < rank:
            off = tl.load(seg_ptr + seg * 5 + 3)
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for p0 in range(m0, m1, BLOCK_M):
                offs_m = p0 + tl.arange(0, BLOCK_M)
                row_ok = offs_m < m1
                if IDENTITY:
                    rows = offs_m.to(tl.int64)
                else:
                    rows = tl.load(perm_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
                dht = tl.load(dh_ptr + offs_m[:, None].to(tl.int64) * stride_dh + offs_r[None, :],
                              mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                xt = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :],
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                dht = _as_operand(dht, IO_DTYPE, DOT_DTYPE, EMULATE_BF16)
                acc = tl.dot(tl.trans(dht), xt.to(DOT_DTYPE), acc, input_precision=PRECISION)
            gp = g_ptr + off + offs_r[:, None].to(tl.int64) * K + offs_k[None, :]
            mask = r_ok[:, None] & k_ok[None, :]
            if USE_ATOMIC:
                tl.atomic_add(gp, acc, mask=mask)
            else:
                tl.store(gp, acc, mask=mask)

    @triton.jit
    def _grad_b_kernel(
        dy_ptr, h_ptr, perm_ptr, g_ptr, chunks_ptr, seg_ptr, scale_ptr,
        N, stride_dy, stride_h,
        USE_ATOMIC: tl.constexpr, IDENTITY: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        IO_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        """dB_seg[n-tile, r-block] (+)= scale * dy[perm[chunk], n-tile]^T @ h[chunk, r-block]."""
        chunk = tl.program_id(0)
        n0 = tl.program_id(1) * BLOCK_N
        r0 = tl.program_id(2) * BLOCK_R
        seg = tl.load(chunks_ptr + chunk * 3)
        m0 = tl.load(chunks_ptr + chunk * 3 + 1)
        m1 = tl.load(chunks_ptr + chunk * 3 + 2)
        rank = tl.load(seg_ptr + seg * 5)
        if r0 < rank:
            off = tl.load(seg_ptr + seg * 5 + 4)
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
            for p0 in range(m0, m1, BLOCK_M):
                offs_m = p0 + tl.arange(0, BLOCK_M)
                row_ok = offs_m < m1
                if IDENTITY:
                    rows = offs_m.to(tl.int64)
                else:
                    rows = tl.load(perm_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
                dyt = tl.load(dy_ptr + rows[:, None] * stride_dy + offs_n[None, :],
                              mask=row_ok[:, None] & n_ok[None, :], other=0.0)
                ht = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * stride_h + offs_r[None, :],
                             mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                ht = _as_operand(ht, IO_DTYPE, DOT_DTYPE, EMULATE_BF16)
                acc = tl.dot(tl.trans(dyt.to(DOT_DTYPE)), ht, acc, input_precision=PRECISION)
            acc = acc * tl.load(scale_ptr + seg)
            gp = g_ptr + off + offs_n[:, None].to(tl.int64) * rank + offs_r[None, :]
            mask = n_ok[:, None] & r_ok[None, :]
            if USE_ATOMIC:
                tl.atomic_add(gp, acc, mask=mask)
            else:
                tl.store(gp, acc, mask=mask)

    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    # TRITON_INTERPRET=1 (read by triton.jit when this module is imported) runs the kernels on CPU
    _INTERPRET = type(_shrink_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    _TL_DTYPES = {}
    _INTERPRET = False
