"""reportTo tensorboard: the task's scalars as TensorBoard event files in <task output>/tensorboard/."""
from __future__ import annotations

from muxtune.engine.observe.telemetry import StepRecord

LOG_DIR = "tensorboard"


class TensorBoardTracker:
    def __init__(self, task):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(task.out_dir / LOG_DIR))

    def phase(self, task) -> None:
        pass

    def step(self, task, record: StepRecord) -> None:
        w, n = self.writer, record.step
        w.add_scalar("train/loss", record.loss, n)
        w.add_scalar("train/learning_rate", record.lr, n)
        w.add_scalar("train/tokens_per_second", record.tokens_per_second, n)
        w.add_scalar("train/grad_norm", record.grad_norm, n)
        if record.eval_loss is not None:
            w.add_scalar("eval/loss", record.eval_loss, n)
        w.flush()  # a PEFT step takes far longer than a flush; a crash loses no step

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
