"""The pipeline schedule of one round: which stage runs which micro-batch's forward or backward when.

Each flush is a one-forward-one-backward (1F1B) pipeline: stage s runs min(P-1-s, M) warm-up
forwards, then alternates one forward and one backward, then drains the remaining backwards.
With cross-task interleaving the round is one flush whose micro-batches alternate between tasks,
so one task's warm-up and drain are filled with other tasks' micro-batches; without it, each
task's micro-batches are a flush of their own and every flush pays its own bubble.

The tick model (every forward or backward one tick, a stage waits for its input) is what
--print-schedule shows and what the bubble count uses; the engine measures wall-clock busy and
idle time per stage separately.
"""
from __future__ import annotations

from dataclasses import dataclass

F, B = "F", "B"


@dataclass(frozen=True)
class Action:
    kind: str  # F or B
    mb: int  # micro-batch index within the round

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}"


def one_f_one_b(mbs: list[int], stages: int, stage: int) -> list[Action]:
    """A stage's actions for one 1F1B flush over the micro-batches mbs (in order)."""
    m = len(mbs)
    warmup = min(stages - 1 - stage, m)
    out = [Action(F, mbs[i]) for i in range(warmup)]
    for i in range(m - warmup):
        out += [Action(F, mbs[warmup + i]), Action(B, mbs[i])]
    out += [Action(B, mbs[i]) for i in range(m - warmup, m)]
    return out


def stage_actions(flushes: list[list[int]], stages: int) -> list[list[Action]]:
    """Every stage's action list for the round: its flushes one after the other."""
    return [[a for flush in flushes for a in one_f_one_b(flush, stages, s)] for s in range(stages)]


def simulate(actions: list[list[Action]]) -> list[dict[int, Action]]:
    """Tick of each action per stage (unit-time actions; F waits for the previous stage's F of the
    same micro-batch, B for the next stage's B, the last stage's B for its own F)."""
    stages = len(actions)
    done: dict[tuple[str, int, int], int] = {}  # (kind, mb, stage) -> tick it finished
    pos = [0] * stages
    free = [0] * stages
    timeline: list[dict[int, Action]] = [{} for _ in range(stages)]
    remaining = sum(len(a) for a in actions)
    while remaining:
        progressed = False
        for s in range(stages):
            if pos[s] >= len(actions[s]):
                continue
            a = actions[s][pos[s]]
            dep = (F, a.mb, s - 1) if a.kind == F else ((B, a.mb, s + 1) if s < stages - 1 else (F, a.mb, s))
            if a.kind == F and s == 0:
                ready = 0
            elif dep in done:
                ready = done[dep]
            else:
                continue
            tick = max(free[s], ready)
            timeline[s][tick] = a
            done[(a.kind, a.mb, s)] = tick + 1
            free[s] = tick + 1
            pos[s] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocks")  # a bug in one_f_one_b, never user input
    return timeline


def bubble_fraction(timeline: list[dict[int, Action]]) -> list[float]:
    """Per stage: idle ticks / ticks of the whole round (from the first action to the last)."""
    span = max((t + 1 for stage in timeline for t in stage), default=0)
    return [(span - len(stage)) / span if span else 0.0 for stage in timeline]


def render(timeline: list[dict[int, Action]], labels: dict[int, str], title: str = "") -> str:
    """A table: one row per stage, one column per tick, cells like F3:taskname ('.' = idle)."""
    span = max((t + 1 for stage in timeline for t in stage), default=0)
    cells = [[f"{a}:{labels.get(a.mb, '')}".rstrip(":") if (a := stage.get(t)) else "." for t in range(span)]
             for stage in timeline]
    width = max([len(c) for row in cells for c in row] + [len(str(span - 1)) if span else 1])
    lines = [title] if title else []
    lines.append("tick     " + " ".join(str(t).ljust(width) for t in range(span)))
    for s, row in enumerate(cells):
        lines.append(f"stage {s:<2} " + " ".join(c.ljust(width) for c in row))
    fractions = bubble_fraction(timeline)
    lines.append("idle     " + ", ".join(f"stage {s} {f:.0%}" for s, f in enumerate(fractions)))
    return "\n".join(lines)
