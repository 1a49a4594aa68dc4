"""Contiguous partition of a sequence of costs into stages, minimising the costliest stage.

Pure Python (no torch): the engine splits its decoder layers with it (engine/parallel/split.py)
and the operator's memory model predicts the same split (operator/memory.py), so both agree.
"""
from __future__ import annotations


def contiguous_bounds(first: float, costs: list[float], last: float, stages: int) -> list[tuple[int, int]]:
    """(start, end) per stage over `costs`; stage 0 also pays `first`, the last stage `last`.
    Exact dynamic programme; ties go to the split that puts items earlier."""
    n = len(costs)
    if stages <= 1:
        return [(0, n)]
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, b: int) -> float:
        return prefix[b] - prefix[a] + (first if s == 0 else 0.0) + (last if s == stages - 1 else 0.0)

    # best[s][b]: least possible max cost placing costs[:b] on stages 0..s (stage s ends at b)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for b in range(1, n + 1):
        best[0][b] = cost(0, 0, b)
    for s in range(1, stages):
        for b in range(s + 1, n + 1):
            for a in range(s, b):
                v = max(best[s - 1][a], cost(s, a, b))
                if v < best[s][b]:
                    best[s][b], cut[s][b] = v, a
    bounds, b = [], n
    for s in range(stages - 1, 0, -1):
        a = cut[s][b]
        bounds.append((a, b))
        b = a
    bounds.append((0, b))
    return bounds[::-1]
