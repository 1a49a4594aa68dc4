"""One task's private state inside a shared engine: adapter, optimizer, schedule, data, progress."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from muxtune.api.finetunetask import FineTuneTask, TrainingSpec
from muxtune.engine.backbone import TaskAdapter
from muxtune.engine.data import DataStream, Example

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
log = logging.getLogger("muxtune.engine")


def lr_lambda(training: TrainingSpec):
    """Linear warmup, then constant, linear or cosine decay to zero at maxSteps."""

    def f(step: int) -> float:
        if training.warmup_steps and step < training.warmup_steps:
            return (step + 1) / training.warmup_steps
        if training.schedule == "constant":
            return 1.0
        span = max(1, training.max_steps - training.warmup_steps)
        progress = min(1.0, (step - training.warmup_steps) / span)
        if training.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


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
    last_step_time: float = field(default_factory=time.monotonic)
    last_loss: float | None = None
    tokens_per_second: float | None = None
    checkpoint: str | None = None
    examples_dropped: int = 0  # records with no label token within maxSeqLen: never trained on
    examples_read: int = 0

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
        return self.task.spec.training.max_steps

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

    def build_optimizer(self) -> None:
        t = self.task.spec.training
        self.optimizer = torch.optim.AdamW(
            self.adapter.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))

    def begin_step(self) -> None:
        """Draw the next step's batch; its loss is normalised by its label tokens, whatever forwards it spans."""
        batch = self.stream.next_batch(self.task.spec.training.batch_size)
        self.pending = list(batch)
        self.step_label_tokens = sum(ex.label_tokens for ex in batch)
        self.step_tokens = sum(len(ex.input_ids) for ex in batch)
        self.step_loss_sum = 0.0
        self.step_fused_with = set()
        self.step_real = self.step_computed = 0

    def write_status(self) -> None:
        from muxtune.engine.checkpoint import spec_hash

        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "status.json").write_text(json.dumps({
            "task": self.key, "phase": self.phase, "step": self.step, "totalSteps": self.max_steps,
            "loss": self.last_loss, "message": self.message, "specHash": spec_hash(self.task.spec),
            "examplesDropped": self.examples_dropped,
        }, indent=2))

    def status(self) -> dict:
        """The engine's /v1/status entry for this task (the operator copies it into the CR)."""
        return {
            "phase": self.phase, "step": self.step, "totalSteps": self.max_steps,
            "loss": self.last_loss, "tokensPerSecond": self.tokens_per_second,
            "checkpoint": self.checkpoint, "message": self.message,
            "examplesDropped": self.examples_dropped,
        }
