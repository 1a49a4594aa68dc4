"""Admin floors on serving SLOs: a task may not ask its group for a tighter time-to-first-token or
time-per-output-token than the cluster allows. The strictest member's SLOs bound the whole group's
training rounds (engine/serve/controller.py), so without a floor one tenant's sloTpotMs: 0.001
would leave the group's other tenants almost no training time."""
from __future__ import annotations

from dataclasses import dataclass

from muxtune.operator.policy import Refusal

REASON = "SloBelowFloor"


@dataclass(frozen=True)
class SloFloors:
    ttft_ms: float | None = None  # --min-slo-ttft-ms: the least spec.serving.sloTtftMs admitted
    tpot_ms: float | None = None  # --min-slo-tpot-ms: the least spec.serving.sloTpotMs admitted


def refusal(task, floors: SloFloors) -> Refusal | None:
    """Why a serving task's SLOs are below the floors (it stays Pending until raised), or None."""
    serving = task.spec.serving
    if serving is None or not serving.enabled:
        return None
    low = [f"spec.serving.{field} is {value:g} ms, below the cluster's floor of {floor:g} ms"
           for field, value, floor in (("sloTtftMs", serving.slo_ttft_ms, floors.ttft_ms),
                                       ("sloTpotMs", serving.slo_tpot_ms, floors.tpot_ms))
           if floor is not None and value < floor]
    if not low:
        return None
    return Refusal(REASON, "; ".join(low) + " (set by the cluster admin: operator.sloFloors)", False)
