"""The KV cache of requests in flight, and the attention that reads it.

A static pool: per layer, K and V buffers of [rows, kv_heads, max_model_len, head_dim], one row
per request in flight, allocated once when serving starts. Memory is therefore fixed and known up
front: a request is admitted only when a row is free and its prompt plus max_tokens fit in a row,
so load can make requests wait (or be refused with 429), never run the process out of memory.

`serve_attention` is registered with transformers' AttentionInterface. During an inference forward
(`forward.py`) the backbone's attention layers call it with the new tokens' (post-RoPE) keys and
values of every request, flattened into one row; it writes them into each request's cache row and
attends each request's queries to its own cache only: one batched call for the decode tokens (one
query each), one call per prefill chunk (causal from the chunk's offset). Nothing here depends on
the training batch's mask or attention implementation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from muxtune.engine.model.attention import softcapped_attention

ATTENTION_NAME = "muxtune_serve"


def kv_shape(config, tp: int = 1) -> tuple[int, int]:
    """(key/value heads of one tensor-parallel rank, head dim): tp splits the heads (engine/parallel/tensor.py)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return kv_heads // tp, getattr(config, "head_dim", None) or config.hidden_size // heads


def check_kv_memory(need: int, device: torch.device) -> None:
    """Refuse, with the numbers, a KV cache that would not fit next to training (never OOM later)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room, where = int(free * 0.5), "half the free GPU memory"
    else:
        import psutil

        room, where = int(psutil.virtual_memory().available * 0.5), "half the available host memory"
    if need > room:
        raise ValueError(f"the KV cache needs {need / 2**30:.2f} GiB (max-num-seqs x max-model-len), more than {where} "
                         f"({room / 2**30:.2f} GiB); lower --max-num-seqs or --max-model-len")


@dataclass
class AttentionPlan:
    """Where each token of one inference forward goes: built once per iteration, read by every layer."""

    pool: KVPool
    tok_row: torch.Tensor  # [T] cache row of each token
    tok_pos: torch.Tensor  # [T] position of each token in its request
    decode_idx: torch.Tensor | None  # [D] token indices of requests with one new token
    decode_rows: torch.Tensor | None  # [D] their cache rows
    decode_len: torch.Tensor | None  # [D] their context lengths including the new token
    decode_max: int  # longest of decode_len
    prefill: list[tuple[int, int, int, int]]  # (start, end, row, offset) per prefill chunk

    def on(self, device: torch.device) -> AttentionPlan:
        """The index tensors on a layer's device (a backbone spread over several GPUs), copied once."""
        if self.tok_row.device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            move = (lambda t: None if t is None else t.to(device))
            copies[device] = AttentionPlan(self.pool, move(self.tok_row), move(self.tok_pos), move(self.decode_idx),
                                           move(self.decode_rows), move(self.decode_len), self.decode_max, self.prefill)
        return copies[device]


class KVPool:
    """Per-layer K/V buffers with one row per request in flight. Each rank of a group holds its own
    part: the layers of its pipeline stage (the others' are meta tensors, no memory) and, under
    tensor parallelism, its block of the key/value heads (what its attention modules compute)."""

    def __init__(self, config, layer_devices: list[torch.device], dtype: torch.dtype, rows: int, max_len: int,
                 tp: int = 1):
        self.kv_heads, self.head_dim = kv_shape(config, tp)
        self.rows, self.max_len = rows, max_len
        shape = (rows, self.kv_heads, max_len, self.head_dim)
        with torch.inference_mode():
            self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
            self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        self.free = list(range(rows - 1, -1, -1))

    @classmethod
    def for_backbone(cls, backbone, rows: int, max_len: int) -> KVPool:
        """This process's pool for its part of the backbone; ValueError, with the numbers, when it would
        not fit next to training (never OOM later)."""
        devices = [next(layer.parameters()).device for layer in backbone.layers]  # meta: another stage's
        tp = next(iter(backbone.shards.values())).world if backbone.shards else 1
        local = [d for d in devices if d.type != "meta"]
        config = backbone.model.config
        check_kv_memory(cls.bytes_needed(config, len(local), backbone.dtype, rows, max_len, tp), local[0])
        return cls(config, devices, backbone.dtype, rows, max_len, tp)

    @staticmethod
    def bytes_needed(config, layers: int, dtype: torch.dtype, rows: int, max_len: int, tp: int = 1) -> int:
        kv_heads, head_dim = kv_shape(config, tp)
        return 2 * layers * rows * kv_heads * max_len * head_dim * torch.finfo(dtype).bits // 8

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def allocate(self) -> int | None:
        return self.free.pop() if self.free else None

    def release(self, row: int) -> None:
        self.free.append(row)

    @property
    def used(self) -> int:
        return self.rows - len(self.free)


def serve_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, serve_plan=None,
                    sliding_window=None, softcap=None, **_):
    """query [1, H, T, d]; key/value [1, kv_heads, T, d] of this forward's tokens. Returns [1, T, H, d].
    What the layer's attention module asks for is honoured as its eager attention does: `sliding_window`
    (a query sees its last W keys, itself included; per layer, so window patterns follow the model) and
    `softcap` (scores = softcap * tanh(scores / softcap))."""
    plan: AttentionPlan = serve_plan
    if plan is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention runs only inside a serving forward")
    layer = module.layer_idx
    K, V = plan.pool.k[layer], plan.pool.v[layer]
    plan = plan.on(K.device)
    # write the new keys/values into their requests' rows: K[row, :, pos] = k[token]
    K[plan.tok_row, :, plan.tok_pos] = key[0].transpose(0, 1).to(K.dtype)
    V[plan.tok_row, :, plan.tok_pos] = value[0].transpose(0, 1).to(V.dtype)
    heads, d = query.shape[1], query.shape[3]
    out = query.new_empty(query.shape[2], heads, d)  # [T, H, d]
    if plan.decode_idx is not None:
        q = query[0].index_select(1, plan.decode_idx).transpose(0, 1).unsqueeze(2)  # [D, H, 1, d]
        # slice to the longest context first: gather only the positions in use, not whole rows
        k = K[:, :, : plan.decode_max].index_select(0, plan.decode_rows)
        v = V[:, :, : plan.decode_max].index_select(0, plan.decode_rows)
        keys = torch.arange(plan.decode_max, device=q.device)[None, :]
        keep = keys < plan.decode_len[:, None]
        if sliding_window:
            keep &= keys >= plan.decode_len[:, None] - sliding_window
        o = _attend(q, k.to(q.dtype), v.to(q.dtype), keep[:, None, None, :], scaling, softcap)
        out[plan.decode_idx] = o[:, :, 0]
    for start, end, row, offset in plan.prefill:
        n = end - start
        q = query[:, :, start:end]
        k = K[row:row + 1, :, : offset + n].to(q.dtype)
        v = V[row:row + 1, :, : offset + n].to(q.dtype)
        # query i sits at position offset + i and sees keys up to there (the last W of them with a window)
        at = offset + torch.arange(n, device=q.device)[:, None]
        keys = torch.arange(offset + n, device=q.device)[None, :]
        keep = keys <= at
        if sliding_window:
            keep &= at - keys < sliding_window
        o = _attend(q, k, v, keep, scaling, softcap)
        out[start:end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _attend(q, k, v, keep: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    """SDPA under a boolean mask; with a softcap, the explicit scores the models' eager attention computes."""
    if softcap:
        return softcapped_attention(q, k, v, keep, scale, softcap)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, serve_attention)
