"""GPU memory model for one backbone group: pure arithmetic, no API calls, no clock.

Per GPU of a group with parallelism dp x tp x pp (tp and pp inside one pod, dp pods):

    weights / (tp * pp)
  + sum over member tasks of
        adapter state / (tp * pp)          params + grads + fp32 master + AdamW m and v
      + activations / (tp * dp)            for the task's per-step token budget
  + runtime reserve                        CUDA context, NCCL buffers, allocator fragmentation

Figures and why:

* Weights: ``parameters * dtype bytes``. tp shards every linear layer, pp splits the layers.
* Adapter state, 16 bytes per trainable parameter: the parameter and its gradient in the
  compute dtype (2 + 2 for bf16), an fp32 master copy (4) and AdamW's two fp32 moments (8);
  for fp32 compute the master copy is the parameter itself, which again gives 4 + 4 + 8.
  LoRA adds ``r * (d_in + d_out)`` per adapted module per layer, IA3 one vector of d_out
  (d_in for feed-forward modules). Module shapes come from the name (q/k/v/o projections are
  h x h, gate/up are h x ffn, down is ffn x h), with ``ffn`` derived from the parameter count.
* Activations: ``tokens * layers * hidden * 17 * dtype bytes`` with ``tokens = batchSize *
  maxSeqLen``. Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
  Models" (2022), count ``s*b*h*(34 + 5*a*s/h)`` bytes per layer for 16-bit training without
  recomputation; with fused (flash / SDPA) attention the ``5*a*s/h`` score term is not stored,
  leaving 34 bytes = 17 values of width h per token per layer. A frozen backbone saves a little
  less (inputs of frozen linears are not kept for weight gradients), so 17 is an upper estimate
  the operator can lower with ``activation_factor``. Logits add ``tokens * vocab * (dtype + 8)``
  bytes (the logits, their fp32 up-cast for the loss and its gradient). The sizing assumes every
  member fuses its whole step into one forward/backward (spatial multiplexing, no task waits);
  tp shards activations (with sequence parallelism), dp splits the batch, and pp does not
  lower the first stage's peak under 1F1B (it holds pp micro-batches of L/pp layers).
* Reserve: 1 GiB (CUDA context + NCCL) plus 5% of the GPU for allocator fragmentation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from muxtune.api.basemodel import Architecture

MiB = 1024**2
GiB = 1024**3

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_STATE_BYTES_PER_PARAM = 16
DEFAULT_ACTIVATION_FACTOR = 17.0
DEFAULT_VOCAB = 32000

# Figures of the engine's built-in test models (engine/models.py BUILTIN_CONFIGS, byte tokenizer
# with 259 tokens). Kept here so the operator never imports the engine (torch).
BUILTIN_ARCHITECTURES: dict[str, Architecture] = {
    "tiny-llama": Architecture(
        parameters=800_000, layers=4, hidden_size=128, num_attention_heads=4, vocab_size=259, dtype="bfloat16"
    ),
    "small-llama": Architecture(
        parameters=25_500_000, layers=8, hidden_size=512, num_attention_heads=8, vocab_size=259, dtype="bfloat16"
    ),
}

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "query", "key", "value", "c_attn", "c_proj", "qkv_proj", "dense")
_UP = ("gate_proj", "up_proj", "fc1", "c_fc", "w1", "w3", "gate_up_proj", "dense_h_to_4h")
_DOWN = ("down_proj", "fc2", "w2", "dense_4h_to_h")
_VOCAB = ("lm_head", "embed_tokens", "wte")


@dataclass(frozen=True)
class MemoryConfig:
    activation_factor: float = DEFAULT_ACTIVATION_FACTOR
    reserve_fixed_bytes: int = 1 * GiB
    reserve_fraction: float = 0.05

    def reserve(self, gpu_memory_bytes: int) -> int:
        return self.reserve_fixed_bytes + int(self.reserve_fraction * gpu_memory_bytes)


@dataclass(frozen=True)
class Parallelism:
    dp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def gpus_per_pod(self) -> int:
        return self.tp * self.pp

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass(frozen=True)
class TaskShape:
    """The slice of a FineTuneTask the memory model reads."""

    method: str = "lora"
    r: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    feedforward_modules: tuple[str, ...] = ()
    num_virtual_tokens: int = 0
    batch_size: int = 8
    max_seq_len: int = 512

    @property
    def tokens(self) -> int:
        return self.batch_size * (self.max_seq_len + self.num_virtual_tokens)


@dataclass(frozen=True)
class TaskMemory:
    trainable_params: int
    adapter_state_bytes: int  # unsharded
    activation_bytes: int  # unsharded, for the task's whole step

    @property
    def total_bytes(self) -> int:
        return self.adapter_state_bytes + self.activation_bytes

    def per_gpu(self, par: Parallelism) -> int:
        return math.ceil(self.adapter_state_bytes / (par.tp * par.pp)) + math.ceil(
            self.activation_bytes / (par.tp * par.dp)
        )


def dtype_bytes(arch: Architecture) -> int:
    return DTYPE_BYTES[arch.dtype]


def weight_bytes(arch: Architecture) -> int:
    return arch.parameters * dtype_bytes(arch)


def ffn_size(arch: Architecture) -> int:
    """Feed-forward width, from the parameter count of a gated (Llama-style) block.

    per-layer params ~ 4h^2 (attention) + 3*h*ffn (gate, up, down); clamped to [h, 8h],
    falling back to 8h/3 when the count is too small to say.
    """
    h, L = arch.hidden_size, arch.layers
    embed = 2 * (arch.vocab_size or 0) * h
    per_layer = (arch.parameters - embed) / L
    ffn = (per_layer - 4 * h * h) / (3 * h)
    if ffn < h:
        ffn = 8 * h / 3
    return int(min(ffn, 8 * h))


def _module_shape(name: str, arch: Architecture) -> tuple[int, int, int]:
    """(d_in, d_out, count) of the modules a target name matches (suffix match)."""
    h = arch.hidden_size
    base = name.rsplit(".", 1)[-1]
    if base in _UP:
        return h, ffn_size(arch), arch.layers
    if base in _DOWN:
        return ffn_size(arch), h, arch.layers
    if base in _VOCAB:
        return h, arch.vocab_size or DEFAULT_VOCAB, 1
    # attention projections and anything unknown: h x h in every layer
    return h, h, arch.layers


def trainable_params(shape: TaskShape, arch: Architecture) -> int:
    if shape.method == "lora":
        total = 0
        for m in shape.target_modules:
            d_in, d_out, n = _module_shape(m, arch)
            total += shape.r * (d_in + d_out) * n
        return total
    if shape.method == "ia3":
        total = 0
        for m in shape.target_modules:
            d_in, d_out, n = _module_shape(m, arch)
            total += (d_in if m in shape.feedforward_modules else d_out) * n
        return total
    if shape.method == "prompt_tuning":
        return max(shape.num_virtual_tokens, 1) * arch.hidden_size
    # an unknown method: size it like LoRA on the listed modules (conservative)
    return trainable_params(TaskShape(**{**shape.__dict__, "method": "lora"}), arch)


def task_memory(shape: TaskShape, arch: Architecture, config: MemoryConfig = MemoryConfig()) -> TaskMemory:
    d = dtype_bytes(arch)
    params = trainable_params(shape, arch)
    state = params * ADAPTER_STATE_BYTES_PER_PARAM
    tokens = shape.tokens
    act = tokens * arch.layers * arch.hidden_size * config.activation_factor * d
    act += tokens * (arch.vocab_size or DEFAULT_VOCAB) * (d + 8)
    return TaskMemory(trainable_params=params, adapter_state_bytes=state, activation_bytes=int(math.ceil(act)))


def group_memory_per_gpu(
    arch: Architecture,
    members: list[TaskMemory] | tuple[TaskMemory, ...],
    par: Parallelism,
    gpu_memory_bytes: int,
    config: MemoryConfig = MemoryConfig(),
) -> int:
    """Planned bytes on the busiest GPU of the group, reserve included."""
    w = math.ceil(weight_bytes(arch) / (par.tp * par.pp))
    return w + sum(m.per_gpu(par) for m in members) + config.reserve(gpu_memory_bytes)


def fits(
    arch: Architecture,
    members: list[TaskMemory] | tuple[TaskMemory, ...],
    par: Parallelism,
    gpu_memory_bytes: int,
    config: MemoryConfig = MemoryConfig(),
) -> bool:
    return group_memory_per_gpu(arch, members, par, gpu_memory_bytes, config) <= gpu_memory_bytes


def resolve_architecture(
    base_model: str, basemodels: Mapping[str, Architecture | None]
) -> tuple[Architecture | None, str]:
    """Architecture for a FineTuneTask.spec.baseModel, or (None, why not).

    ``basemodels`` maps BaseModel resource names to their figures (spec.architecture, else
    status.architecture; None when the resource exists without figures).
    """
    if base_model.startswith("builtin:"):
        name = base_model.split(":", 1)[1]
        arch = BUILTIN_ARCHITECTURES.get(name)
        return (arch, "") if arch else (None, f"unknown built-in model {name!r}")
    if base_model.startswith("model:"):
        name = base_model.split(":", 1)[1]
        if name not in basemodels:
            return None, f"BaseModel {name!r} not found"
        arch = basemodels[name]
        if arch is None:
            return None, f"BaseModel {name!r} has no architecture figures yet (spec.architecture or status.architecture)"
        return arch, ""
    return None, f"no size figures for {base_model!r}: reference a BaseModel (model:NAME) that has spec.architecture"
