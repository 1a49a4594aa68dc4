"""What every dataset format becomes: token ids with their next-token targets."""
from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


class RowError(ValueError):
    """One record is unusable; the reader prefixes the file and line or row."""


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    targets: tuple[int, ...]  # next-token targets aligned with input_ids; IGNORE where no loss

    @property
    def label_tokens(self) -> int:
        return sum(t != IGNORE for t in self.targets)
