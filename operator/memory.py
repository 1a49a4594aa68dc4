"""GPU memory model of one backbone group, per rank: pure arithmetic, no API calls, no clock, no torch.

A group with parallelism dp x tp x pp runs dp replicas (pods) of a pipeline of pp stages, each
stage's Linears sharded over tp ranks. Every rank of stage ``s`` holds, term by term, what the
engine (engine/model/stage.py, engine/peft/, engine/parallel/) keeps there:

* **weights**: the frozen backbone's parameters of the stage's decoder layers (Linear weights
  / tp; norms replicated), plus the embedding on the first stage and the final norm and LM head on
  the last. Layers are split over stages exactly as the engine splits them
  (:func:`split_layers`, the same cost model and dynamic programme as engine/parallel/split.py).
* **adapter state**: 16 bytes per trainable parameter of the member tasks' deltas on the stage:
  the engine keeps deltas in fp32 whatever the backbone dtype (the parameter 4, its gradient 4,
  AdamW's two moments 8). Under tp a column-parallel module (q/k/v/gate/up) shards LoRA B, a
  row-parallel one (o/down) shards LoRA A, the other factor replicated.
* **activations**: the tensors autograd saves for backward, counted for the engine's Llama-style
  blocks with SDPA attention (flash / memory-efficient kernels: no score matrix), per token and
  layer: the two RMSNorm inputs (HF upcasts them to fp32: 4 bytes each whatever the dtype) and
  their rstd, attention's q, k, v (k and v repeated to every head) and output plus its
  log-sum-exp, the MLP's gate, up and activation outputs; frozen Linears save no input. Each
  task adds its deltas' saved tensors on its own tokens (LoRA: its input, sharded for a
  row-parallel base, and the rank-r intermediate), IA3 a scaled tensor and its per-token scales
  on every token of the micro-batch it is in. Per micro-batch: the block-diagonal mask
  (tokens x sequence length) and the rotary cos/sin; on the last stage the final norm's input and
  the fp32 log-softmax over the vocabulary (every token counted as a label: an upper bound).
  Which micro-batches are alive at once follows the engine's schedule: with pp = 1 one fused
  micro-batch holds every member's step share; with pp > 1 each task's replica share is split
  into up to pp micro-batches and stage ``s`` of a 1F1B flush holds at most ``pp - s`` of them
  (the largest ones are assumed). dp splits each task's batch over the replicas.
* **transient**: the gradient of the logits at the start of backward (not saved, but alive with
  everything above on the last stage).
* **reserve**: 1 GiB (CUDA context, NCCL buffers) plus 5% of the GPU (allocator fragmentation).

**families** (their layouts in muxtune/facts/families.py, the figures read from config.json): the
query and attention output are heads x head_dim wide, the MLP gated (gate, up, down) or fc1/fc2,
fused q/k/v and gate/up projections sized as one Linear; a MoE layer's weights hold every expert
and the router (replicated under tp), its activations only the experts each token is routed to.
A sliding window changes no term: the varlen kernels save no scores, windowed or not.

**token budget** (the engine's --token-budget): one round fuses at most that many real tokens per
replica (a single sequence longer than it still runs alone), the tasks beyond it take turns; so a
group's activations are at most those of one budget's round, whatever its members: the budget's
tokens, each at the costliest member's bytes per token and every member's distinct delta inputs
(:meth:`GroupMemory.budget_activations`). Without a budget every member's whole step is fused.
**recompute** (the engine's --recompute, activation checkpointing per decoder layer): a layer keeps
only its input (hidden size x dtype per token) and recomputes its saved tensors in backward, one
layer at a time, so a stage holds its layers' inputs plus one layer's full saved set. tests/operator/test_memory_model.py measures the engine's ranks on CPU
(parameter, gradient and AdamW bytes; the peak of live saved tensors) and checks these terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from muxtune.api.basemodel import Architecture
from muxtune.facts import shards
from muxtune.operator.shapes import (
    _vocab, ffn_size, head_dim, heads, layer_linear_params, layer_params, layout, moe, module_of, q_size)
from muxtune.facts.builtin_models import BUILTIN_ARCHITECTURES  # noqa: F401  (operator/world.py reads it here)
from muxtune.facts.methods import Linear as Module
from muxtune.facts.methods import DEFAULT_METHOD, get_peft_method
from muxtune.facts.quantization import quant_decl
from muxtune.partition import contiguous_bounds

MiB = 1024**2
GiB = 1024**3

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_STATE_BYTES_PER_PARAM = 16  # fp32 delta + fp32 gradient + AdamW exp_avg + exp_avg_sq
FP32 = 4
NOMINAL_CONTEXT = 256  # the engine's attention cost term when splitting layers (engine/parallel/split.py)

@dataclass(frozen=True)
class MemoryConfig:
    activation_scale: float = 1.0  # multiplies the modelled activations (e.g. < 1 under recomputation)
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

    method: str = DEFAULT_METHOD  # a registered method (muxtune.facts.methods)
    r: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    feedforward_modules: tuple[str, ...] = ()
    num_virtual_tokens: int = 0
    batch_size: int = 8
    max_seq_len: int = 512

    @property
    def seq_len(self) -> int:
        return self.max_seq_len + self.num_virtual_tokens

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class TaskMemory:
    """A task's figures, unsharded; :func:`rank_memory` places them on ranks."""

    shape: TaskShape
    trainable_params: int
    adapter_state_bytes: int  # unsharded
    activation_bytes: int  # unsharded: the whole step in one micro-batch on one rank
    modules: tuple[Module, ...] = field(default=(), repr=False)

    @property
    def total_bytes(self) -> int:
        return self.adapter_state_bytes + self.activation_bytes


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one GPU (rank) of pipeline stage ``stage``."""

    stage: int
    layers: int
    weights: int
    adapter_state: int
    activations: int
    transient: int
    reserve: int

    @property
    def resident(self) -> int:
        """What the engine holds at its peak (the terms the engine's accounting measures)."""
        return self.weights + self.adapter_state + self.activations

    @property
    def total(self) -> int:
        return self.resident + self.transient + self.reserve


# --------------------------------------------------------------------------- shapes


_CACHE: dict = {}  # the planner asks the same questions many times per plan


def _cached(key, compute):
    value = _CACHE.get(key)
    if value is None:
        if len(_CACHE) > 100_000:
            _CACHE.clear()
        value = _CACHE[key] = compute()
    return value


def _akey(arch: Architecture) -> tuple:
    return (arch.parameters, arch.layers, arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads,
            arch.intermediate_size, arch.vocab_size, arch.dtype, arch.model_type, arch.head_dim, arch.num_experts,
            arch.num_experts_per_tok, arch.moe_intermediate_size)



def dtype_bytes(arch: Architecture) -> int:
    return DTYPE_BYTES[arch.dtype]


def weight_bytes(arch: Architecture) -> int:
    if quant_decl(arch.quantization) is None:
        return arch.parameters * dtype_bytes(arch)
    return _stage_weights(arch, arch.layers, True, True, 1)


def linear_weight_bytes(arch: Architecture) -> float:
    """Bytes per frozen decoder-Linear weight: the dtype's, or its quantized storage with its scales
    (QLoRA, muxtune/facts/quantization.py; embeddings, LM head and norms stay in the dtype)."""
    decl = quant_decl(arch.quantization)
    return dtype_bytes(arch) if decl is None else decl.bytes_per_weight(arch.hidden_size)


def trainable_params(shape: TaskShape, arch: Architecture) -> int:
    """The method's declared shapes (muxtune.facts.methods): its deltas at the targeted Linears and
    any at the input embeddings."""
    method = get_peft_method(shape.method)
    total = method.input_params(shape, arch.hidden_size)
    for name in shape.target_modules:
        m = module_of(name, arch)
        total += method.linear_params(shape, m) * (arch.layers if m.per_layer else 1)
    return total


# --------------------------------------------------------------------------- pipeline split


def split_layers(arch: Architecture, stages: int) -> list[tuple[int, int]]:
    return list(_cached(("split", _akey(arch), stages), lambda: tuple(_split_layers(arch, stages))))


def _split_layers(arch: Architecture, stages: int) -> list[tuple[int, int]]:
    """(start, end) decoder layers per stage: engine/parallel/split.py's balanced split (cost in
    multiply-accumulates per token: a layer's Linear weights plus attention over NOMINAL_CONTEXT
    positions; the embedding lookup on the first stage, norm and LM head on the last), contiguous
    ranges minimising the costliest stage, ties to the split that puts layers earlier."""
    n = arch.layers
    h = arch.hidden_size
    layer = float(layer_linear_params(arch) + 2 * q_size(arch) * NOMINAL_CONTEXT)
    return contiguous_bounds(float(h), [layer] * n, float(_vocab(arch) * h + h), stages)


# --------------------------------------------------------------------------- activations


def base_bytes_per_token_layer(arch: Architecture, tp: int = 1) -> float:
    """Saved for backward by one decoder layer per token, without any delta. A sliding window
    changes none of it: the varlen kernels save q, k, v, the output and the log-sum-exp, never scores."""
    d, h = dtype_bytes(arch), arch.hidden_size
    norms = 2 * (h + 1) * FP32  # two RMSNorm inputs (upcast to fp32) and their rstd
    attention = 4 * q_size(arch) * d / tp + heads(arch) / tp * FP32  # q, k, v (all heads), output; log-sum-exp
    return norms + attention + mlp_bytes_per_token(arch, tp)


def mlp_bytes_per_token(arch: Architecture, tp: int = 1) -> float:
    """The MLP's saved tensors per token: a gated MLP's gate, up and act(gate); fc1/fc2's fc1 output
    and its activation; MoE: per routed expert its gate, up, act(gate) and weighted output, and the
    router's fp32 probabilities over the experts (experts are replicated under tp)."""
    d, experts = dtype_bytes(arch), moe(arch)
    if experts:
        n, k, width = experts
        return k * (3 * width + arch.hidden_size) * d + n * FP32
    return (3 if layout(arch).mlp_matrices == 3 else 2) * ffn_size(arch) * d / tp


_INPUT_GROUPS = (  # modules reading the same input tensor, and how wide it is
    ("attention input", shards.ATTENTION_IN),
    ("attention output", shards.ATTENTION_OUT),
    ("mlp input", shards.MLP_IN),
    ("mlp hidden", shards.MLP_OUT),
)


def _input_group(m: Module, arch: Architecture, tp: int) -> tuple[str, float]:
    """(group, elements per token) of the tensor a delta on ``m`` must keep: the norm outputs are
    kept only for the deltas; the attention output is already saved by attention (o_proj reads a
    view of it); the MLP hidden state (down_proj's input) is new and sharded under tp."""
    for group, names in _INPUT_GROUPS:
        if m.name in names:
            if group == "attention output":
                return group, 0.0
            return group, (m.d_in / tp if m.row_parallel else m.d_in)
    return m.name, float(m.d_in)


def delta_inputs(shape: TaskShape, arch: Architecture, tp: int = 1) -> dict[str, float]:
    """Bytes per token, by input group, that the task's deltas keep for every token of a micro-batch
    they are in: one copy of each distinct input (the fused LoRA kernel reads rows through the
    permutation; engine/peft/lora_kernel.py), and for IA3 the scaled tensor and its per-token scales
    (other tasks' tokens are scaled by one)."""
    d, out, method = dtype_bytes(arch), {}, get_peft_method(shape.method)
    if method.attaches != "linear":
        return out
    for name in shape.target_modules:
        m = module_of(name, arch)
        if not m.per_layer:
            continue
        group, width = _input_group(m, arch, tp)
        if method.keeps_input(shape, name):
            out[group] = max(out.get(group, 0.0), width * d)  # the input, once per group
        out.update(method.saved_outputs(shape, name, m, d, tp))
    return out


def own_bytes_per_token_layer(shape: TaskShape, arch: Architecture, tp: int = 1) -> float:
    """Saved by the task's deltas in one layer per token of the task (LoRA: each module's rank-r
    intermediate, fp32 in the fused kernel)."""
    method = get_peft_method(shape.method)
    modules = (module_of(n, arch) for n in shape.target_modules)
    return sum(method.own_saved(shape, m) for m in modules if m.per_layer)


def _task_terms(shape: TaskShape, arch: Architecture, tp: int) -> tuple[float, tuple[tuple[str, float], ...]]:
    """(base + own delta bytes per token and layer, shared delta inputs per token and layer)."""
    return _cached(("terms", shape, _akey(arch), tp), lambda: (
        base_bytes_per_token_layer(arch, tp) + own_bytes_per_token_layer(shape, arch, tp),
        tuple(delta_inputs(shape, arch, tp).items())))


class GroupMemory:
    """The ranks of one group, members added one by one (the planner's first fit asks "and with
    this task?" many times; each answer costs one pass over the group's micro-batches).

    Micro-batches follow engine/parallel/plan.py: each member's step is split over the dp replicas;
    with pp = 1 one fused micro-batch holds every member's share; with pp > 1 each share becomes up
    to pp micro-batches of that task alone, interleaved (micro-batch i of every task, then i + 1),
    and stage s holds the costliest window of pp - s consecutive ones (1F1B keeps that many in
    flight)."""

    def __init__(self, arch: Architecture, par: Parallelism, gpu_memory_bytes: int,
                 config: MemoryConfig = MemoryConfig(), token_budget: int | None = None, recompute: bool = False):
        self.arch, self.par, self.config = arch, par, config
        self.token_budget, self.recompute = token_budget, recompute
        self.input_bytes = arch.hidden_size * dtype_bytes(arch)  # a checkpointed layer's saved input, per token
        self.own_max = 0.0  # the costliest member's own bytes per token and layer (budgeted rounds)
        self.split = split_layers(arch, par.pp)
        n = len(self.split)
        self.flags = [(b - a, s == 0, s == n - 1) for s, (a, b) in enumerate(self.split)]
        self.weights = [_stage_weights(arch, *f, par.tp) for f in self.flags]
        self.coef = [self._coefficients(s) for s in range(n)]
        self.reserve = config.reserve(gpu_memory_bytes)
        self.state = [0] * n
        self.members: list[TaskMemory] = []
        self.tokens = self.seq = 0  # pp = 1: the fused micro-batch
        self.layer_bytes = 0.0
        self.shared: dict[str, float] = {}
        self.mbs: list[list[tuple[int, int, float]]] = []  # pp > 1: per task, (tokens, seq, layer bytes)

    def _coefficients(self, s: int) -> tuple[int, float, float]:
        """Stage s: (layers, bytes per token per sequence position, other bytes per token) of a
        micro-batch besides its layers' saved tensors: the block-diagonal mask, rotary cos and
        sin, and on the last stage the final norm's fp32 input and the fp32 log-softmax."""
        arch, (layers, _first, last) = self.arch, self.flags[s]
        d, h = dtype_bytes(arch), arch.hidden_size
        per_token = 2 * head_dim(arch) * d + (((h + 1) + _vocab(arch)) * FP32 if last else 0)
        return layers, float(d), float(per_token)

    def _mb(self, tokens: int, seq: int, layer_bytes: float, s: int) -> float:
        layers, per_pos, per_token = self.coef[s]
        return self._layers(layers, tokens, layer_bytes) + tokens * (seq * per_pos + per_token)

    def _layers(self, layers: int, tokens: int, layer_bytes: float) -> float:
        """A micro-batch's saved tensors in ``layers`` decoder layers (with recompute: their inputs,
        and one layer's full set while it is recomputed)."""
        if not self.recompute or not layers:
            return layers * layer_bytes
        return layers * tokens * self.input_bytes + layer_bytes

    def budget_tokens(self, seq: int) -> int:
        """Real tokens one replica's round can hold: the budget, or one longer sequence alone; under
        dp one more sequence for the uneven split of a round over the replicas."""
        assert self.token_budget
        return max(self.token_budget, seq) + (seq if self.par.dp > 1 else 0)

    def budget_activations(self, s: int, seq: int, own: float, shared: float) -> tuple[float, int]:
        """(activations, largest micro-batch tokens) of stage s when a round holds one budget:
        a pipeline's micro-batches in flight together hold no more tokens than the round."""
        tokens = self.budget_tokens(seq)
        return self._mb(tokens, seq, tokens * (own + shared), s), tokens

    def _task_mbs(self, m: TaskMemory) -> list[tuple[int, int, float]]:
        def compute():
            seqs = math.ceil(m.shape.batch_size / self.par.dp)
            k = max(1, min(seqs, self.par.pp))
            tokens = math.ceil(seqs / k) * m.shape.seq_len
            own, inputs = _task_terms(m.shape, self.arch, self.par.tp)
            return [(tokens, m.shape.seq_len, tokens * (own + sum(v for _, v in inputs)))] * k
        return _cached(("mbs", m.shape, _akey(self.arch), self.par), compute)

    def _activations(self, extra: TaskMemory | None, stages: list[int]) -> list[tuple[float, int]]:
        """(activations, largest micro-batch tokens) of ``stages``, with ``extra`` as one more member;
        under a token budget the lesser of the fused step and one budget's round."""
        fused = self._fused_activations(extra, stages)
        if not self.token_budget or not self.members and extra is None:
            return fused
        seq, own, shared = self.seq, self.own_max, dict(self.shared)
        if extra is not None:
            e_own, inputs = _task_terms(extra.shape, self.arch, self.par.tp)
            seq, own = max(seq, extra.shape.seq_len), max(own, e_own)
            for k, v in inputs:
                shared[k] = max(shared.get(k, 0.0), v)
        capped = [self.budget_activations(s, seq, own, sum(shared.values())) for s in stages]
        return [min(f, c) for f, c in zip(fused, capped)]

    def _fused_activations(self, extra: TaskMemory | None, stages: list[int]) -> list[tuple[float, int]]:
        if self.par.pp == 1:
            tokens, seq, layer_bytes, shared = self.tokens, self.seq, self.layer_bytes, self.shared
            if extra is not None:
                t = math.ceil(extra.shape.batch_size / self.par.dp) * extra.shape.seq_len
                own, inputs = _task_terms(extra.shape, self.arch, self.par.tp)
                tokens, seq, layer_bytes = tokens + t, max(seq, extra.shape.seq_len), layer_bytes + t * own
                shared = dict(shared)
                for k, v in inputs:
                    shared[k] = max(shared.get(k, 0.0), v)
            if not tokens:
                return [(0.0, 0)] * len(stages)
            return [(self._mb(tokens, seq, layer_bytes + tokens * sum(shared.values()), 0), tokens)]
        per_task = self.mbs + ([self._task_mbs(extra)] if extra is not None else [])
        order = [x[i] for i in range(max((len(x) for x in per_task), default=0)) for x in per_task if i < len(x)]
        biggest = max((t for t, _, _ in order), default=0)
        out = []
        for s in stages:
            layers, per_pos, per_token = self.coef[s]
            sizes = [self._layers(layers, t, lb) + t * (q * per_pos + per_token) for t, q, lb in order]
            window = min(len(sizes), self.par.pp - s)
            run = best = sum(sizes[:window])
            for i in range(window, len(sizes)):  # sliding window
                run += sizes[i] - sizes[i - window]
                if run > best:
                    best = run
            out.append((best, biggest))
        return out

    def _stage_state(self, m: TaskMemory) -> list[int]:
        return [ADAPTER_STATE_BYTES_PER_PARAM * _cached(("state", m.shape, _akey(self.arch), self.par.tp) + f,
                                                         lambda f=f: _stage_params(m, self.arch, self.par.tp, *f))
                for f in self.flags]

    def add(self, m: TaskMemory) -> GroupMemory:
        self.members.append(m)
        self.state = [a + b for a, b in zip(self.state, self._stage_state(m))]
        own, inputs = _task_terms(m.shape, self.arch, self.par.tp)
        self.seq, self.own_max = max(self.seq, m.shape.seq_len), max(self.own_max, own)
        for k, v in inputs:
            self.shared[k] = max(self.shared.get(k, 0.0), v)
        if self.par.pp == 1:
            t = math.ceil(m.shape.batch_size / self.par.dp) * m.shape.seq_len
            self.tokens, self.layer_bytes = self.tokens + t, self.layer_bytes + t * own
        else:
            self.mbs.append(self._task_mbs(m))
        return self

    def ranks(self, extra: TaskMemory | None = None, stages: list[int] | None = None) -> list[RankMemory]:
        stages = list(range(len(self.flags))) if stages is None else stages
        state = self.state if extra is None else [a + b for a, b in zip(self.state, self._stage_state(extra))]
        out = []
        for s, (act, biggest) in zip(stages, self._activations(extra, stages)):
            layers, _first, last = self.flags[s]
            out.append(RankMemory(s, layers, self.weights[s], state[s], int(math.ceil(act * self.config.activation_scale)),
                                  biggest * _vocab(self.arch) * FP32 if last else 0, self.reserve))
        return out

    def busiest(self, extra: TaskMemory | None = None) -> int:
        """Planned bytes on the busiest GPU (reserve included), with ``extra`` as one more member.
        A middle stage with no more layers than the first holds no more than it (fewer micro-batches
        in flight, no embedding), so only the first, the last and deeper middle stages are sized."""
        n = len(self.flags)
        stages = sorted({0, n - 1} | {s for s in range(1, n - 1) if self.flags[s][0] > self.flags[0][0]})
        return max(r.total for r in self.ranks(extra, stages))


# --------------------------------------------------------------------------- per task, per rank


def task_memory(shape: TaskShape, arch: Architecture, config: MemoryConfig = MemoryConfig()) -> TaskMemory:
    params = trainable_params(shape, arch)
    modules = tuple(module_of(n, arch) for n in shape.target_modules)
    tm = TaskMemory(shape, params, params * ADAPTER_STATE_BYTES_PER_PARAM, 0, modules)
    (one,) = GroupMemory(arch, Parallelism(), 0, config).add(tm).ranks()
    return TaskMemory(shape, params, tm.adapter_state_bytes, one.activations, modules)


def _stage_weights(arch: Architecture, layers: int, first: bool, last: bool, tp: int) -> int:
    """The stage's frozen parameters in bytes (decoder Linears at linear_weight_bytes), scaled so that
    the stages of a pp=1, tp=1 split add up to the architecture's own parameter count (tied heads,
    biases, unusual blocks)."""
    h, v = arch.hidden_size, _vocab(arch)
    modelled = arch.layers * (layer_params(arch) + 2 * h) + 2 * v * h + h
    experts = layer_params(arch) - layer_linear_params(arch)  # replicated under tp
    # the tp-split Linears at their stored bytes (QLoRA: 4/8-bit plus scales), in dtype units
    linear = layer_linear_params(arch) / tp * (linear_weight_bytes(arch) / dtype_bytes(arch))
    per_layer = linear + experts + 2 * h
    params = layers * per_layer + (v * h if first else 0) + (v * h + h if last else 0)
    return int(math.ceil(params * arch.parameters / modelled * dtype_bytes(arch)))


def _stage_params(m: TaskMemory, arch: Architecture, tp: int, layers: int, first: bool, last: bool) -> int:
    """The task's trainable parameters on one rank of a stage with ``layers`` decoder layers."""
    method = get_peft_method(m.shape.method)
    n = method.input_params(m.shape, arch.hidden_size) if first else 0
    for mod in m.modules:
        k = method.linear_params(m.shape, mod, tp)
        if mod.per_layer:
            n += k * layers
        elif (mod.name == "lm_head" and last) or (mod.name != "lm_head" and first):
            n += k
    return n


def rank_memory(arch: Architecture, members: list[TaskMemory] | tuple[TaskMemory, ...], par: Parallelism,
                gpu_memory_bytes: int, config: MemoryConfig = MemoryConfig(), token_budget: int | None = None,
                recompute: bool = False) -> list[RankMemory]:
    """One RankMemory per pipeline stage (every dp replica and tp rank of a stage holds the same)."""
    g = GroupMemory(arch, par, gpu_memory_bytes, config, token_budget, recompute)
    for m in members:
        g.add(m)
    return g.ranks()


def group_memory_per_gpu(
    arch: Architecture,
    members: list[TaskMemory] | tuple[TaskMemory, ...],
    par: Parallelism,
    gpu_memory_bytes: int,
    config: MemoryConfig = MemoryConfig(),
    token_budget: int | None = None,
    recompute: bool = False,
) -> int:
    """Planned bytes on the busiest GPU of the group, reserve included."""
    return max(r.total for r in rank_memory(arch, members, par, gpu_memory_bytes, config, token_budget, recompute))


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
