"""Per-task examples: read records (bounded, engine/datafile.py), encode them (truncated before
tokenising), and stream batches in a seeded, resumable order."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from muxtune.api.finetunetask import DatasetSpec
from muxtune.engine.datafile import DataFileError, DataLimits, read_lines
from muxtune.engine.paths import PathEscapeError, confined
from muxtune.engine.truncation import token_prefix

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
    """<s> prompt completion </s>, truncated; targets are the shifted inputs within one sequence.

    Only the tokens that can fit are tokenised (engine/truncation.py): the result equals
    tokenising both texts whole and truncating to max_len.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p = token_prefix(tokenizer, prompt, max_len - len(bos))
    c = token_prefix(tokenizer, completion, max_len - len(bos) - len(p))
    ids = (bos + p + c + eos)[:max_len]
    completion_start = len(bos) + len(p)
    # position i predicts ids[i+1]; without train_on_prompt only completion tokens are targets
    targets = [
        ids[i + 1] if i + 1 < len(ids) and (train_on_prompt or i + 1 >= completion_start) else IGNORE
        for i in range(len(ids))
    ]
    return Example(tuple(ids), tuple(targets))


# ----- reading: records from a file, one reader per dataset.format --------------------------
@dataclass(frozen=True)
class Record:
    where: str  # "path:line", for errors
    prompt: str
    completion: str


def read_jsonl(path: Path, spec: DatasetSpec, limits: DataLimits, shown: str) -> Iterator[Record]:
    for n, line in read_lines(path, limits, shown):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{shown}:{n}: not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise DatasetError(f"{shown}:{n}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{shown}:{n}: expected a JSON object")
        missing = [f for f in (spec.prompt_field, spec.completion_field) if not isinstance(row.get(f), str)]
        if missing:
            raise DatasetError(f"{shown}:{n}: missing string field(s) {', '.join(missing)}")
        yield Record(f"{shown}:{n}", row[spec.prompt_field], row[spec.completion_field])


# dataset.format -> reader(path, spec, limits, shown): other formats plug in here
READERS: dict[str, Callable[..., Iterator[Record]]] = {"jsonl": read_jsonl}


@dataclass
class LoadedDataset:
    examples: list[Example]
    records: int  # records read
    dropped: int  # records with no label token left within maxSeqLen (not trained on)


def dataset_file(spec: DatasetSpec, base_dir: Path | None = None) -> Path:
    """The file a task's dataset.path names: a relative path is resolved under the data root
    (base_dir, default the current directory) and must stay inside it, symlinks included."""
    try:
        return confined(base_dir or Path.cwd(), spec.path, "dataset.path", "data root")
    except PathEscapeError as exc:
        raise DatasetError(str(exc)) from None


def load_dataset(spec: DatasetSpec, tokenizer, base_dir: Path | None = None,
                 limits: DataLimits | None = None) -> LoadedDataset:
    """Read, encode and count: every record becomes an example unless it has no label token."""
    path, shown = dataset_file(spec, base_dir), spec.path  # errors name the path as the task wrote it
    reader = READERS[spec.format]
    examples, records = [], 0
    try:
        for rec in reader(path, spec, limits or DataLimits(), shown):
            records += 1
            ex = encode(tokenizer, rec.prompt, rec.completion, spec.max_seq_len, spec.train_on_prompt)
            if ex.label_tokens:
                examples.append(ex)
    except (DataFileError, DatasetError) as exc:
        raise DatasetError(f"dataset.path: {exc}") from None
    if not examples:
        why = f" ({records} read; none has a completion token within maxSeqLen {spec.max_seq_len})" if records else ""
        raise DatasetError(f"dataset.path: {shown} has no usable examples{why}")
    return LoadedDataset(examples, records, records - len(examples))


def load_examples(spec: DatasetSpec, tokenizer, base_dir: Path | None = None,
                  limits: DataLimits | None = None) -> list[Example]:
    return load_dataset(spec, tokenizer, base_dir, limits).examples


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
