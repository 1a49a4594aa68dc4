"""A local progress bar over all tasks' steps, and the closing summary table."""
from __future__ import annotations

import sys

from muxtune.engine.observe.telemetry import RoundRecord, Telemetry


class ProgressBar(Telemetry):
    """All tasks' steps on one bar. Its total follows membership (--watch joins and leaves), and
    log lines are written above it, not glued onto its line."""

    def __init__(self, trainer):
        from tqdm import tqdm

        self.trainer = trainer
        self.steps: dict[str, list[int]] = {}  # task key -> [steps counted, steps planned]
        self.bar = tqdm(total=0, unit="step", dynamic_ncols=True, file=sys.stderr, desc="muxtune")
        self.ratio = None
        for t in trainer.tasks.values():
            self._track(t)
        self._logs = _LogsAboveBar(self.bar)

    def _track(self, task) -> None:
        done = task.step if task.phase != "Failed" else task.max_steps
        counted = self.steps.setdefault(task.key, [done, task.max_steps])
        counted[0], counted[1] = max(counted[0], done), max(task.max_steps, done)
        self._refresh()

    def _refresh(self) -> None:
        self.bar.total = sum(planned for _, planned in self.steps.values())
        self.bar.n = sum(done for done, _ in self.steps.values())
        self.bar.refresh()

    def _postfix(self):
        losses = {t.name: f"{t.last_loss:.3f}" for t in self.trainer.tasks.values() if t.last_loss is not None}
        if self.ratio is not None:
            losses["eff"] = f"{self.ratio:.2f}"
        self.bar.set_postfix(losses, refresh=False)

    def step_done(self, task, record):
        self.steps.setdefault(task.key, [0, task.max_steps])[0] += 1
        self.bar.update(1)
        self._postfix()

    def task_phase(self, task):
        if task.phase == "Failed":  # its remaining steps will not run
            self._track(task)
            self.bar.write(f"task {task.key} failed: {task.message}")
        elif task.phase == "Suspended":  # left the run (--watch): its remaining steps are not this run's
            done = self.steps.get(task.key, [task.step])[0]
            self.steps[task.key] = [done, done]
            self._refresh()
        else:  # joined, resumed or finished
            self._track(task)

    def round_done(self, record: RoundRecord):
        self.ratio = record.effective_token_ratio

    def close(self):
        self._logs.restore()
        self.bar.close()


class _LogsAboveBar:
    """Point the stderr log handlers at tqdm.write while the bar is shown, then back."""

    def __init__(self, bar):
        import logging

        self.swapped = []
        for h in logging.getLogger("muxtune").handlers:
            if isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__):
                self.swapped.append((h, h.stream))
                h.setStream(_BarStream(bar, h.stream))

    def restore(self) -> None:
        for h, stream in self.swapped:
            h.setStream(stream)
        self.swapped = []


class _BarStream:
    """A file-like object for a logging handler: whole lines go through tqdm.write, which clears
    the bar, writes the line and redraws the bar below it."""

    def __init__(self, bar, stream):
        self.bar, self.stream, self.pending = bar, stream, ""

    def write(self, text: str) -> None:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.bar.write(line, file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


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
