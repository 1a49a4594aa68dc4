"""Per-tenant time share of a co-serving group: one tenant's traffic cannot take more than its
share of the group's time from the other tenants' training.

The SLO controller (controller.py) serves inference first and trains in what the deadlines leave,
so one tenant's burst of requests could starve every other tenant's training. Over a sliding
window this counts the seconds spent on each tenant's (namespace's) requests and on training. A
tenant whose inference took more than an equal share of the window is over its share; while the
tenants that train, and are not over it, got less training time than their shares add up to,
training is owed: the co-serving loop then runs a full training round whatever the deadlines
(the over-share tenant's requests wait; everyone else's SLOs are unaffected by its traffic).
"""
from __future__ import annotations

from collections import deque

TRAINING = "\0training"  # the window's key for training seconds (no namespace is named so)


def tenant_of(name: str | None) -> str:
    """The namespace of a served model name or task key (namespace/name); '' for the base model."""
    return name.split("/", 1)[0] if name and "/" in name else ""


def request_tenants(requests) -> list[str]:
    """One tenant per request (GenerationRequest.model: its served name or task key)."""
    return [tenant_of(getattr(r.model, "task_key", None) or getattr(r.model, "name", None)) for r in requests] or [""]


class TenantTimeShare:
    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self.spent: deque[tuple[float, str, float]] = deque()  # (when, tenant or TRAINING, seconds)

    def record_inference(self, now: float, seconds: float, tenants: list[str]) -> None:
        """An iteration's inference time, split evenly over the requests it served (one entry each)."""
        for t in tenants:
            self.spent.append((now, t, seconds / len(tenants)))

    def record_training(self, now: float, seconds: float) -> None:
        if seconds > 0:
            self.spent.append((now, TRAINING, seconds))

    def training_owed(self, now: float, training_tenants: set[str]) -> bool:
        """Whether over-share tenants' inference is keeping the others' training below its share."""
        while self.spent and self.spent[0][0] < now - self.window_s:
            self.spent.popleft()
        by: dict[str, float] = {}
        for _, who, s in self.spent:
            by[who] = by.get(who, 0.0) + s
        total = sum(by.values())
        trained = by.pop(TRAINING, 0.0)
        tenants = set(by) | training_tenants
        if not tenants or total <= 0:
            return False
        share = total / len(tenants)
        over = {t for t, s in by.items() if s > share}
        owed = training_tenants - over
        return bool(over) and bool(owed) and trained < share * len(owed)
