"""One frozen backbone shared by every task in the process.

Tasks attach deltas at the Linears their spec targets; a packed batch of many tasks' sequences
runs through one forward/backward, and the loss is split back per task. Under pipeline
parallelism a process holds one stage: the other stages' layers stay as shapes only (meta
tensors), so every rank still draws each task's initial deltas in the same order as one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.model import attention, families
from muxtune.engine.model.loading import LoadedBackbone
from muxtune.engine.packing import PackedBatch
from muxtune.engine.peft.base import ShardSpec, TaskDelta
from muxtune.engine.peft.mux_linear import MultiplexedLinear, MuxContext
from muxtune.engine.peft.prompt_tuning import PromptDelta
from muxtune.engine.peft.registry import get_method, matches_target
from muxtune.engine.model.stage import ForwardResult, Stage

__all__ = ["ForwardResult", "MultiplexedBackbone", "TaskAdapter"]


@dataclass
class TaskAdapter:
    """A task's deltas by backbone module name."""

    slot: int
    spec: PeftSpec
    deltas: dict[str, TaskDelta]

    def parameters(self) -> list[nn.Parameter]:
        return [p for d in self.deltas.values() for p in d.parameters()]

    def stable_name(self, module: str, name: str) -> str:
        """A tensor's name in checkpoints and task state (PeftMethod.stable_name)."""
        return get_method(self.spec.method).stable_name(module, name)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys exactly as PEFT's save_pretrained writes them."""
        key = get_method(self.spec.method).peft_key
        out = {}
        for module, delta in sorted(self.deltas.items()):
            for name, tensor in delta.peft_state().items():
                out[key(self.stable_name(module, name))] = tensor.detach()
        return out

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        key = get_method(self.spec.method).peft_key
        for module, delta in self.deltas.items():
            delta.load_peft_state({name: state[key(self.stable_name(module, name))] for name in delta.peft_state()})


class MultiplexedBackbone:
    """The model's own modules, multiplexed: its family (engine/model/families.py) says where the
    decoder layers are; Conv1D projections become Linears over the same storage; the packed
    attention is installed; and the fidelity probe (engine/model/probe.py) checks, before any task
    attaches, that the packed forward equals the model's own forward on each sequence alone."""

    def __init__(self, loaded: LoadedBackbone, probe: bool = True):
        self.model = loaded.model
        self.family = families.family_of(self.model)
        self.conv1d = families.linearize_conv1d(self.model)  # names of the GPT-2-style projections
        attention.install(self.model)  # per-sequence attention from the batch's boundaries, no dense mask
        self.tokenizer = loaded.tokenizer
        self.path = loaded.path
        self.quantization = loaded.quantization  # the decoder Linears' storage (QLoRA)
        self.trust_remote_code = loaded.trust_remote_code  # for whoever loads from path again (a tokenizer)
        self.ctx = MuxContext()
        self.recompute = False  # activation checkpointing per decoder layer (engine/model/stage.py)
        self.decoder = self.model.get_decoder()  # the base model (tests run it without the LM head)
        self.layers = families.decoder_layers(self.model, self.family)
        self.embedding = self.model.get_input_embeddings()
        self.lm_head = self.model.get_output_embeddings()
        self.linears = {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Linear) and m is not self.lm_head}
        self.wrapped: dict[str, MultiplexedLinear] = {}
        self.shards: dict[str, ShardSpec] = {}  # tensor parallel: each sharded Linear's part (engine/parallel/tensor.py)
        self.adapters: dict[int, TaskAdapter] = {}
        self.prompts: dict[int, PromptDelta] = {}  # slot -> its virtual tokens (prompt tuning)
        self._next_slot, self._free_slots = 0, []  # slot ids: the trainer's tasks and the server's adapter versions
        self.attn_ratio = self._attention_to_linear_ratio()
        self.device = self.embedding.weight.device  # where a batch enters
        self.stage = Stage(self, 0, len(self.layers), first=True, last=True)
        self.local_linears = set(self.linears)  # the Linears this process computes (all but under pp)
        if probe:
            from muxtune.engine.model.probe import check_fidelity

            self.fidelity = check_fidelity(self)  # raises ModelLoadError on a mismatch: nothing trains

    def partition(self, start: int, end: int, first: bool, last: bool, device: torch.device) -> None:
        """Keep decoder layers [start, end) on device, with the input embedding on the first stage and
        the LM head on the last (both where they are tied); the other layers and vocab matrices become
        meta tensors: shapes without memory. Everything else (norms, positional embeddings, rotary,
        projections in/out) is small and stays on every stage, since each runs the model's forward."""
        tied = self.lm_head.weight is self.embedding.weight
        for i, layer in enumerate(self.layers):
            layer.to(device if start <= i < end else "meta")
        vocab = {id(self.embedding): first or (tied and last), id(self.lm_head): last or (tied and first)}
        for module in (self.embedding, self.lm_head):
            module.to(device if vocab[id(module)] else "meta")
        placed = {id(m) for part in (*self.layers, self.embedding, self.lm_head) for m in part.modules()}
        for module in self.model.modules():  # the rest, whatever its family calls it
            if id(module) not in placed:
                _place(module, device)
        self.device = device
        self.stage = Stage(self, start, end, first, last)
        local = {id(m) for layer in self.layers[start:end] for m in layer.modules()}
        self.local_linears = {n for n, m in self.linears.items() if id(m) in local}

    def attention_kwargs(self, batch: PackedBatch) -> dict:
        """What the decoder layers get to keep attention within each packed sequence: the packed
        sequences' boundaries for the engine's varlen attention (engine/model/attention.py), no dense mask."""
        return {"attention_mask": None, **attention.attention_inputs(batch)}

    def _attention_to_linear_ratio(self) -> float:
        """Attention FLOPs per (query, key) pair / linear FLOPs per token, for packing."""
        cfg = self.model.config
        # in x out, not weight.numel(): a quantized (QLoRA) weight's storage is packed
        linear = sum(m.in_features * m.out_features for m in self.linears.values()) + self.lm_head.weight.numel()
        layers = getattr(cfg, "num_hidden_layers", 1)
        heads = getattr(cfg, "num_attention_heads", 1)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return (2 * layers * heads * head_dim) / max(1, linear)  # QK^T and PV, 2 MACs each vs 1 MAC per weight

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_slot(self, reuse: bool = True) -> int:
        """A slot id no one else holds (released ones are reused, so ids stay small). The trainer's
        tasks take fresh ones (reuse=False): their order by slot is the order they joined, with or
        without serving, which the scheduler's tie-break and the checkpoint cuts rely on."""
        if reuse and self._free_slots:
            return self._free_slots.pop()
        self._next_slot += 1
        return self._next_slot - 1

    def release_slot(self, slot: int) -> None:
        self._free_slots.append(slot)

    def _wrap(self, name: str) -> MultiplexedLinear:
        if name not in self.wrapped:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            mux = MultiplexedLinear(self.linears[name], self.ctx)
            setattr(parent, child, mux)
            self.wrapped[name] = mux
        return self.wrapped[name]

    def attach(self, slot: int, spec: PeftSpec, seed: int) -> TaskAdapter:
        """Create the task's deltas (seeded by the task alone, so neighbours cannot change them)."""
        method = get_method(spec.method)
        if method.attaches == "input":
            return self._attach_input(slot, spec, method, torch.Generator().manual_seed(seed))
        if (refused := self.family.unsupported_targets(spec.target_modules)) is not None:
            raise ValueError(refused)
        names = self._targeted_linears(spec.target_modules)
        generator = torch.Generator().manual_seed(seed)  # CPU: same init on any device or layout
        deltas = {}
        for name in names:  # model order, as PEFT initialises; other stages' deltas are drawn and dropped
            delta = method.make_delta(self.linears[name], name, spec, generator)
            if name in self.shards:  # made whole from the generator, then this rank's part kept
                delta.shard_(self.shards[name])
            if name in self.local_linears:
                self._wrap(name).deltas[str(slot)] = delta
                deltas[name] = delta
        adapter = TaskAdapter(slot, spec, deltas)
        self.adapters[slot] = adapter
        return adapter

    def _targeted_linears(self, targets: list[str]) -> list[str]:
        """The Linears the targets name; a target that names none is an error (a typo would
        otherwise train fewer modules than asked for, silently, whenever another target matches)."""
        # the output head is a Linear a target may name (PEFT's rule), though it is not multiplexed
        candidates = [*self.linears, *(n for n, m in self.model.named_modules() if m is self.lm_head)]
        unmatched = [t for t in targets if not any(matches_target(n, [t]) for n in candidates)]
        if unmatched:
            raise ValueError(
                f"peft.targetModules: {unmatched} name no Linear of this backbone "
                f"(e.g. {', '.join(sorted({n.rsplit('.', 1)[-1] for n in self.linears})[:8])})"
            )
        return [n for n in self.linears if matches_target(n, targets)]

    def _attach_input(self, slot: int, spec: PeftSpec, method, generator) -> TaskAdapter:
        """A delta at the input embeddings (prompt tuning): no Linear is wrapped."""
        emb = self.embedding
        name = next(n for n, m in self.model.named_modules() if m is emb)
        delta = method.make_delta(emb, name, spec, generator, tokenizer=self.tokenizer)
        self.prompts[slot] = delta
        adapter = self.adapters[slot] = TaskAdapter(slot, spec, {name: delta})
        return adapter

    def detach(self, slot: int) -> None:
        self.prompts.pop(slot, None)
        adapter = self.adapters.pop(slot, None)
        if adapter is None:
            return
        for name in adapter.deltas:
            if name not in self.wrapped:
                continue
            deltas = self.wrapped[name].deltas
            if str(slot) in deltas:
                del deltas[str(slot)]

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """Full [rows, chunk, vocab] logits, as the model's own forward makes them (its logit
        scaling and softcapping included); this process must hold the whole backbone."""
        return self.stage.logits(batch)

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether adapted projections are Conv1D (PEFT's fan_in_fan_out, written to adapter_config)."""
        return bool(self.conv1d)

    def forward_loss(self, batch: PackedBatch) -> ForwardResult:
        """Token losses summed per task; the LM head runs only where there is a target."""
        return self.stage.forward(batch)


def _place(module: nn.Module, device: torch.device) -> None:
    """Move a module's own parameters and buffers (not its children's) to device."""
    for name, p in list(module._parameters.items()):
        if p is not None and p.device != device:
            module._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
    for name, b in list(module._buffers.items()):
        if b is not None and b.device != device:
            module._buffers[name] = b.to(device)
