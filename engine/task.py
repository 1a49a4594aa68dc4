"""One task's private state inside a shared engine: adapter, optimizer, schedule, data, progress.

`state_dict()` / `load_state_dict()` move all of it as full tensors keyed by stable names
(checkpoint.TaskState), so a checkpoint resumes under any slot, device or parallel layout.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch

from muxtune.api.finetunetask import FineTuneTask, TrainingSpec
from muxtune.engine.model.backbone import TaskAdapter
from muxtune.engine.durable import storage
from muxtune.engine.durable.checkpoint import TaskState, spec_hash
from muxtune.engine.data.dataset import DataStream, Example, LoadedDataset
from muxtune.engine.peft.prompt_tuning import prepend_virtual
from muxtune.facts.quantization import NO_QUANTIZATION

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
log = logging.getLogger("muxtune.engine")


def total_steps(training: TrainingSpec, examples: int) -> int:
    """maxSteps, or the steps training.epochs passes over the examples take (the last one may wrap)."""
    if training.max_steps is not None:
        return training.max_steps
    return max(1, math.ceil(training.epochs * examples / training.batch_size))


def lr_lambda(training: TrainingSpec, steps: int | None = None):
    """Linear warmup, then constant, linear or cosine decay to zero at the last step."""
    steps = steps if steps is not None else training.max_steps

    def f(step: int) -> float:
        if training.warmup_steps and step < training.warmup_steps:
            return (step + 1) / training.warmup_steps
        if training.schedule == "constant":
            return 1.0
        span = max(1, steps - training.warmup_steps)
        progress = min(1.0, (step - training.warmup_steps) / span)
        if training.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def batch_digest(batch: list[Example]) -> str:
    """A short hash of a step's sequences, so two runs can be compared step by step."""
    h = hashlib.sha256()
    for ex in batch:
        h.update(len(ex.input_ids).to_bytes(4, "little"))
        h.update(array("q", ex.input_ids + ex.targets).tobytes())
    return h.hexdigest()[:16]


def named_tensors(adapter: TaskAdapter) -> dict[str, torch.nn.Parameter]:
    """A task's trainable tensors by stable name: '<module path>.<PEFT tensor name>'."""
    named = {adapter.stable_name(module, name): t for module, delta in sorted(adapter.deltas.items())
             for name, t in delta.peft_state().items()}
    if {id(t) for t in named.values()} != {id(p) for p in adapter.parameters()}:
        raise TypeError("every trainable tensor of a delta must be in its peft_state()")
    return named


def _local_blocks(adapter: TaskAdapter) -> dict:
    """name -> whole tensor -> the block this process holds (itself unless tensor-parallel)."""
    out = {}
    for module, delta in adapter.deltas.items():
        attr = {id(p): n for n, p in delta.named_parameters(recurse=False)}
        for name, t in delta.peft_state().items():
            out[adapter.stable_name(module, name)] = lambda whole, d=delta, a=attr.get(id(t), name): d.local_block(a, whole)
    return out


@dataclass
class TaskRuntime:
    task: FineTuneTask
    slot: int
    out_dir: Path | None  # None: refused (outside the output, or another task's); nothing is written
    phase: str = PENDING
    message: str | None = None
    step: int = 0
    tokens_total: int = 0
    served_tokens: int = 0  # real tokens through the backbone, for fair sharing
    adapter: TaskAdapter | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    stream: DataStream | None = None
    pending: list[Example] = field(default_factory=list)  # the current step's sequences not yet run
    step_label_tokens: int = 0
    step_tokens: int = 0
    step_loss_sum: float = 0.0
    step_fused_with: set[str] = field(default_factory=set)
    step_real: int = 0  # tokens of the forwards this step took part in: real ...
    step_computed: int = 0  # ... and computed (padding included)
    step_digest: str = ""  # which sequences the current step trains (metrics.jsonl "batch")
    step_start: dict | None = None  # data position where the current step's batch begins
    data_fingerprint: str | None = None  # of the tokenised examples (checkpoint.data_fingerprint)
    saves: int = 0  # checkpoints written over the task's life (names a second save at one step)
    saved_step: int | None = None  # the step of the newest checkpoint
    resumed_from: Path | None = None  # the checkpoint this run restored
    resume_candidates: list = field(default_factory=list)  # intact checkpoints found at start, newest first
    last_step_time: float = field(default_factory=time.monotonic)
    last_loss: float | None = None
    tokens_per_second: float | None = None
    checkpoint: str | None = None
    examples_dropped: int = 0  # records with no label token within maxSeqLen: never trained on
    examples_read: int = 0
    steps_total: int | None = None  # maxSteps, or derived from epochs when the data is loaded
    validation: list[Example] | None = None  # held-out examples (dataset.validationPath / validationSplit)
    eval_loss: float | None = None
    eval_step: int | None = None  # the step eval_loss was measured at
    chat_template: str | None = None  # saved with the adapter
    base_quantization: str = NO_QUANTIZATION  # the frozen base it trains on (QLoRA): a resume must match

    @property
    def key(self) -> str:
        return self.task.key

    @property
    def name(self) -> str:
        return self.task.metadata.name

    @property
    def priority(self) -> int:
        return self.task.spec.priority

    @property
    def max_steps(self) -> int:
        return self.steps_total or self.task.spec.training.max_steps or 0

    @property
    def adapter_device(self) -> torch.device:
        return next(iter(self.adapter.parameters())).device

    @property
    def done(self) -> bool:
        return self.phase in (SUCCEEDED, FAILED, SUSPENDED)

    def note_dropped(self, dropped: int, read: int) -> None:
        """Examples too long for maxSeqLen lose their completion; say so instead of training on less."""
        self.examples_dropped, self.examples_read = dropped, read
        if dropped:
            log.warning("examples dropped: no completion token within maxSeqLen", extra={
                "task": self.key, "dropped": dropped, "read": read,
                "maxSeqLen": self.task.spec.dataset.max_seq_len})

    def use_data(self, data: LoadedDataset, fingerprint: str) -> None:
        """The loaded examples: the stream, the held-out set, the steps epochs come to."""
        spec = self.task.spec
        self.note_dropped(data.dropped, data.records)
        self.data_fingerprint = fingerprint
        n = spec.peft.virtual_tokens  # prompt tuning: its virtual positions are part of every sequence
        self.stream = DataStream(prepend_virtual(data.examples, n), spec.training.seed, spec.dataset.shuffle)
        self.validation, self.chat_template = prepend_virtual(data.validation, n), data.chat_template
        self.steps_total = total_steps(spec.training, len(data.examples))

    def build_optimizer(self) -> None:
        t = self.task.spec.training
        self.optimizer = torch.optim.AdamW(
            self.adapter.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t, self.max_steps))

    def begin_step(self) -> None:
        """Draw the next step's batch; its loss is normalised by its label tokens, whatever forwards it spans."""
        self.step_start = self.stream.state()
        batch = self.stream.next_batch(self.task.spec.training.batch_size)
        self.pending = list(batch)
        self.step_label_tokens = sum(ex.label_tokens for ex in batch)
        self.step_tokens = sum(len(ex.input_ids) for ex in batch)
        self.step_loss_sum = 0.0
        self.step_fused_with = set()
        self.step_real = self.step_computed = 0
        self.step_digest = batch_digest(batch)

    # ----- state ----------------------------------------------------------------------
    def state_dict(self) -> TaskState:
        """Everything that decides how the task trains on, as CPU tensors by stable name: whole
        in one process; under tensor parallelism each rank's blocks, which the parallel engine
        gathers whole (engine/parallel/tensor.py gather_full_state) before saving.

        The step in progress is included: the data position where its batch begins, how many
        of its sequences already ran, their summed loss and accumulated gradients."""
        named = named_tensors(self.adapter)
        consumed = len(self.pending) and self.task.spec.training.batch_size - len(self.pending)
        opt_state = self.optimizer.state
        optimizer = {}
        for name, p in named.items():
            moments = {k: v.detach().to("cpu", copy=True) for k, v in opt_state.get(p, {}).items()}
            if any(not torch.is_tensor(v) for v in opt_state.get(p, {}).values()):
                raise TypeError(f"optimizer state of {name} holds non-tensor values")
            if moments:
                optimizer[name] = moments
        grads = {n: p.grad.detach().to("cpu", copy=True) for n, p in named.items() if consumed and p.grad is not None}
        rng = {m: s for m, d in sorted(self.adapter.deltas.items()) if (s := d.rng_state()) is not None}
        meta = {
            "task": self.key, "uid": self.task.metadata.uid, "spec_hash": spec_hash(self.task.spec),
            "data_fingerprint": self.data_fingerprint, "quantization": self.base_quantization,
            "step": self.step, "tokens_total": self.tokens_total,
            "served_tokens": self.served_tokens, "last_loss": self.last_loss, "saves": self.saves,
            "eval_loss": self.eval_loss, "eval_step": self.eval_step,
            "data": self.step_start if self.pending else self.stream.state(),
            "in_progress": {
                "consumed": consumed, "loss_sum": self.step_loss_sum, "fused_with": sorted(self.step_fused_with),
                "real": self.step_real, "computed": self.step_computed,
            } if consumed else None,
            "lr": [g["lr"] for g in self.optimizer.param_groups],
            "lr_schedule": self.scheduler.state_dict(),
        }
        return TaskState(adapter={n: p.detach().to("cpu", copy=True) for n, p in named.items()},
                         optimizer=optimizer, grads=grads, rng=rng, meta=meta)

    def load_state_dict(self, state: TaskState, strict: bool = True) -> None:
        """Apply a state_dict() (any device, slot or layout it was saved from); the stream must
        already hold the task's examples. Raises ValueError when the tensors do not fit.
        strict=False ignores tensors of modules this process does not hold (another stage's).
        Tensors are whole; a tensor-parallel delta keeps its block of each (no communication)."""
        named, block = named_tensors(self.adapter), _local_blocks(self.adapter)

        def local(n: str, t: torch.Tensor) -> torch.Tensor:  # moments and grads shaped like the whole tensor
            return block[n](t) if t.shape == state.adapter[n].shape else t

        missing = sorted(set(named) - set(state.adapter))
        for what, names in (("adapter", state.adapter), ("optimizer", state.optimizer), ("gradient", state.grads)):
            unknown = sorted(set(names) - set(named)) if strict else []
            if unknown or (what == "adapter" and missing):
                raise ValueError(f"{what} tensors do not match the task's adapter: unknown {unknown[:3]}, missing {missing[:3]}")
        meta = state.meta
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(block[n](state.adapter[n]))
                p.grad = None
        index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        torch_state = self.optimizer.state_dict()
        torch_state["state"] = {index[id(named[n])]: {k: local(n, v) for k, v in m.items()}
                                for n, m in state.optimizer.items() if n in named}
        for group, lr in zip(torch_state["param_groups"], meta["lr"]):
            group["lr"] = lr
        self.optimizer.load_state_dict(torch_state)
        self.scheduler.load_state_dict(dict(meta["lr_schedule"]))
        for module, rng in state.rng.items():
            if module in self.adapter.deltas or strict:
                self.adapter.deltas[module].set_rng_state(rng)
        self.stream.restore(meta["data"])
        self.step, self.tokens_total = int(meta["step"]), int(meta["tokens_total"])
        self.served_tokens, self.last_loss = int(meta["served_tokens"]), meta.get("last_loss")
        self.saves, self.saved_step = int(meta.get("saves", 0)), self.step
        self.eval_loss, self.eval_step = meta.get("eval_loss"), meta.get("eval_step")
        self.pending = []
        ip = meta.get("in_progress")
        if ip:  # the step that was half-trained: the same batch, minus what already ran
            self.begin_step()
            del self.pending[: int(ip["consumed"])]
            self.step_loss_sum, self.step_fused_with = float(ip["loss_sum"]), set(ip["fused_with"])
            self.step_real, self.step_computed = int(ip["real"]), int(ip["computed"])
            for n, g in state.grads.items():
                if n in named:
                    named[n].grad = local(n, g).to(named[n].device, named[n].dtype)

    def write_status(self) -> None:
        """status.json, replaced atomically; StorageError (naming the file) when the disk refuses."""
        if self.out_dir is None:
            return
        storage.write_json_atomic(self.out_dir / "status.json", {
            "task": self.key, "uid": self.task.metadata.uid, "phase": self.phase, "step": self.step,
            "totalSteps": self.max_steps, "loss": self.last_loss, "message": self.message,
            "specHash": spec_hash(self.task.spec), "examplesDropped": self.examples_dropped,
            "evalLoss": self.eval_loss,
        })

    def status(self) -> dict:
        """The engine's /v1/status entry for this task (the operator copies it into the CR)."""
        return {
            "phase": self.phase, "step": self.step, "totalSteps": self.max_steps,
            "loss": self.last_loss, "tokensPerSecond": self.tokens_per_second,
            "checkpoint": self.checkpoint, "message": self.message,
            "examplesDropped": self.examples_dropped, "evalLoss": self.eval_loss,
        }
