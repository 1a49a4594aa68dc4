"""What the trainer reports, to whoever listens: metrics files, progress bar, status, Prometheus."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepRecord:
    """One optimizer step of one task: a line of metrics.jsonl."""

    step: int
    loss: float
    tokens: int  # real (non-padding) tokens of the step's sequences
    label_tokens: int  # tokens that carried a loss
    lr: float
    grad_norm: float
    seconds: float  # wall time since the task's previous step
    tokens_per_second: float
    fused_with: list[str] = field(default_factory=list)  # other tasks sharing its forwards
    effective_token_ratio: float = 1.0  # real / computed tokens of the forwards the step spanned
    batch: str = ""  # hash of the step's sequences: equal in two runs iff they trained the same data
    eval_loss: float | None = None  # validation loss after this step, on the steps evaluation ran

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "eval_loss" or v is not None}


@dataclass
class StageRecord:
    """One pipeline stage in one round: seconds computing, and the round's wall time on it."""

    stage: int
    busy_seconds: float
    wall_seconds: float

    @property
    def idle_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.busy_seconds)


@dataclass
class RoundRecord:
    """One fused forward/backward over the shared backbone (one pipeline round under pp)."""

    fused: list[str]  # task keys in this round
    waiting: list[str]  # runnable tasks left out by the token budget
    real_tokens: int  # over the whole group
    computed_tokens: int
    seconds: float
    attention_pairs_needed: int = 0  # (query, key) pairs causal attention within each sequence needs
    attention_pairs_computed: int = 0  # pairs the attention computed (padding tails included)
    stages: list[StageRecord] = field(default_factory=list)  # per pipeline stage (mean over replicas)

    @property
    def effective_token_ratio(self) -> float:
        return self.real_tokens / max(1, self.computed_tokens)

    @property
    def attention_work_ratio(self) -> float | None:
        return self.attention_pairs_needed / self.attention_pairs_computed if self.attention_pairs_computed else None


class Telemetry:
    """No-op base; subclasses override what they need."""

    def task_phase(self, task) -> None: ...

    def step_done(self, task, record: StepRecord) -> None: ...

    def round_done(self, record: RoundRecord) -> None: ...

    def checkpoint_done(self, task, seconds: float, ok: bool) -> None: ...

    def flush(self, task) -> None:
        """Write out what is buffered for the task (before its directory is uploaded)."""

    def close(self) -> None: ...


class Fanout(Telemetry):
    def __init__(self, *sinks: Telemetry):
        self.sinks = [s for s in sinks if s is not None]

    def task_phase(self, task):
        for s in self.sinks:
            s.task_phase(task)

    def step_done(self, task, record):
        for s in self.sinks:
            s.step_done(task, record)

    def round_done(self, record):
        for s in self.sinks:
            s.round_done(record)

    def checkpoint_done(self, task, seconds, ok):
        for s in self.sinks:
            s.checkpoint_done(task, seconds, ok)

    def flush(self, task):
        for s in self.sinks:
            s.flush(task)

    def close(self):
        for s in self.sinks:
            s.close()
