"""Per-task examples: read JSON lines, tokenise, and stream batches in a seeded, resumable order."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from muxtune.api.finetunetask import DatasetSpec

IGNORE = -100


class DatasetError(ValueError):
    """The task's data cannot be used; the message says which file and line."""


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    targets: tuple[int, ...]  # next-token targets aligned with input_ids; IGNORE where no loss

    @property
    def label_tokens(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def encode(tokenizer, prompt: str, completion: str, max_len: int, train_on_prompt: bool) -> Example:
    """<s> prompt completion </s>, truncated; targets are the shifted inputs within one sequence."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (bos + p + c + eos)[:max_len]
    completion_start = len(bos) + len(p)
    # position i predicts ids[i+1]; without train_on_prompt only completion tokens are targets
    targets = [
        ids[i + 1] if i + 1 < len(ids) and (train_on_prompt or i + 1 >= completion_start) else IGNORE
        for i in range(len(ids))
    ]
    return Example(tuple(ids), tuple(targets))


def load_examples(spec: DatasetSpec, tokenizer, base_dir: Path | None = None) -> list[Example]:
    """The task's examples; spec.path is read relative to base_dir (the run's data root)."""
    path = Path(base_dir or ".") / spec.path  # spec.path is relative (the API refuses "/" and "..")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"dataset.path: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset.path: cannot read {path}: {exc}") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{n}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{n}: expected a JSON object")
        missing = [f for f in (spec.prompt_field, spec.completion_field) if not isinstance(row.get(f), str)]
        if missing:
            raise DatasetError(f"{path}:{n}: missing string field(s) {', '.join(missing)}")
        ex = encode(tokenizer, row[spec.prompt_field], row[spec.completion_field], spec.max_seq_len, spec.train_on_prompt)
        if ex.label_tokens:
            examples.append(ex)
    if not examples:
        raise DatasetError(f"dataset.path: {path} has no usable examples")
    return examples


class DataStream:
    """Endless epochs over the examples; the order depends only on (seed, epoch), so it resumes exactly."""

    def __init__(self, examples: list[Example], seed: int, shuffle: bool):
        self.examples, self.seed, self.shuffle = examples, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next_batch(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.examples[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order()
