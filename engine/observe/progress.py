"""A local progress bar over all tasks' steps, and the closing summary table."""
from __future__ import annotations

import sys

from muxtune.engine.observe.telemetry import RoundRecord, Telemetry


class ProgressBar(Telemetry):
    def __init__(self, trainer):
        from tqdm import tqdm

        self.trainer = trainer
        total = sum(t.max_steps for t in trainer.tasks.values())
        done = sum(t.step if t.phase != "Failed" else t.max_steps for t in trainer.tasks.values())
        self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, file=sys.stderr, desc="muxtune")
        self.ratio = None

    def _postfix(self):
        losses = {t.name: f"{t.last_loss:.3f}" for t in self.trainer.tasks.values() if t.last_loss is not None}
        if self.ratio is not None:
            losses["eff"] = f"{self.ratio:.2f}"
        self.bar.set_postfix(losses, refresh=False)

    def step_done(self, task, record):
        self.bar.update(1)
        self._postfix()

    def task_phase(self, task):
        if task.phase == "Failed":  # its remaining steps will not run
            self.bar.update(max(0, task.max_steps - task.step))
            self.bar.write(f"task {task.key} failed: {task.message}")

    def round_done(self, record: RoundRecord):
        self.ratio = record.effective_token_ratio

    def close(self):
        self.bar.close()


def summary_table(tasks) -> str:
    rows = [("TASK", "PHASE", "STEPS", "LOSS", "TOKENS", "DROPPED", "OUTPUT / REASON")]
    for t in tasks:
        loss = f"{t.last_loss:.4f}" if t.last_loss is not None else "-"
        detail = str(t.out_dir) if t.phase == "Succeeded" else (t.message or str(t.out_dir))
        # examples too long for maxSeqLen, not trained on
        dropped = str(getattr(t, "examples_dropped", 0))
        rows.append((t.key, t.phase, f"{t.step}/{t.max_steps}", loss, str(t.tokens_total), dropped, detail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)
