"""Per-task examples: read records (bounded, engine/data/datafile.py), encode them (truncated before
tokenising), and stream batches in a seeded, resumable order."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from muxtune.api import sources
from muxtune.api.finetunetask import DatasetSpec
from muxtune.engine.data.datafile import DataFileError, DataLimits, read_lines
from muxtune.engine.data.examples import IGNORE, Example, RowError  # noqa: F401 - re-exported
from muxtune.engine.data.formats import table
from muxtune.engine.data.formats.chat import ChatEncoder, ChatTemplateError, chat_template, check_messages
from muxtune.engine.data.formats.text import encode_text
from muxtune.engine.data.paths import PathEscapeError, confined
from muxtune.engine.data.truncation import token_prefix
from muxtune.storage import datasets as remote
from muxtune.storage.errors import StorageError


class DatasetError(ValueError):
    """The task's data cannot be used; the message says which file and line."""


def encode(tokenizer, prompt: str, completion: str, max_len: int, train_on_prompt: bool) -> Example:
    """<s> prompt completion </s>, truncated; targets are the shifted inputs within one sequence.

    Only the tokens that can fit are tokenised (engine/data/truncation.py): the result equals
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


# ----- reading: (where, record) pairs from a file, one reader per container --------------
def jsonl_rows(path: Path, limits: DataLimits, shown: str) -> Iterator[tuple[str, dict]]:
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
        yield f"{shown}:{n}", row


# dataset.format -> reader(path, limits, shown); every JSON-lines format shares one reader
READERS: dict[str, Callable[..., Iterator[tuple[str, dict]]]] = {
    "jsonl": jsonl_rows, "chat": jsonl_rows, "text": jsonl_rows,
    "parquet": table.parquet_rows, "hf_disk": table.disk_rows,
}


def row_encoder(spec: DatasetSpec, tokenizer, template: str | None) -> Callable[[dict], list[Example]]:
    """record -> its examples, by what a record holds (spec.row_format); RowError when unusable."""
    kind = spec.row_format
    if kind == "chat":
        enc = ChatEncoder(tokenizer, template, spec.max_seq_len, spec.train_on_prompt)
        return lambda row: enc(check_messages(row, spec.messages_field))
    if kind == "text":
        return lambda row: encode_text(tokenizer, row.get(spec.text_field), spec.max_seq_len)

    def prompt_completion(row: dict) -> list[Example]:
        missing = [f for f in (spec.prompt_field, spec.completion_field) if not isinstance(row.get(f), str)]
        if missing:
            raise RowError(f"missing string field(s) {', '.join(missing)}")
        return [encode(tokenizer, row[spec.prompt_field], row[spec.completion_field], spec.max_seq_len,
                       spec.train_on_prompt)]

    return prompt_completion


@dataclass
class LoadedDataset:
    examples: list[Example]
    records: int  # records read (training and held out)
    dropped: int  # records with no label token left within maxSeqLen (not trained on)
    validation: list[Example] | None = None  # held-out examples (validationPath or validationSplit)
    chat_template: str | None = None  # the template chat rows were rendered with


def dataset_file(spec: DatasetSpec, base_dir: Path | None = None, path: str | None = None,
                 field: str = "dataset.path") -> Path:
    """The file (or directory) a task's dataset.path names: a relative path is resolved under the
    data root (base_dir, default the current directory) and must stay inside it, symlinks included."""
    try:
        return confined(base_dir or Path.cwd(), path or spec.path, field, "data root")
    except PathEscapeError as exc:
        raise DatasetError(str(exc)) from None


def source_file(spec: DatasetSpec, rel: str, field: str, base_dir: Path | None, limits: DataLimits) -> Path:
    """The local file a dataset field names: under the data root, or for s3://BUCKET/KEY a
    fetched copy (limits.fetch) or the copy its staging Job left in the data root."""
    if not sources.is_remote(rel):
        return dataset_file(spec, base_dir, rel, field)
    if not limits.fetch:
        staged = dataset_file(spec, base_dir, remote.staged_relpath(rel), field)
        if not staged.is_file():
            raise DatasetError(f"{field}: {rel}: no staged copy in the data area (the task's staging Job has not "
                               "copied it)")
        return staged
    try:
        return remote.fetch(rel, limits.max_file_bytes)
    except StorageError as exc:
        raise DatasetError(f"{field}: {exc}") from None


def _read(spec: DatasetSpec, rel: str, field: str, encoder, base_dir, limits) -> list[list[Example]]:
    """Each record's examples (a text record may become several), errors naming field, file and line/row."""
    path = source_file(spec, rel, field, base_dir, limits)
    out = []
    try:
        for where, row in READERS[spec.format](path, limits, rel):
            try:
                out.append([ex for ex in encoder(row) if ex.label_tokens])
            except RowError as exc:
                raise DatasetError(f"{where}: {exc}") from None
    except (DataFileError, DatasetError, ChatTemplateError) as exc:
        raise DatasetError(f"{field}: {exc}") from None
    return out


def _held_out(records: int, fraction: float, seed: int) -> set[int]:
    """The records validationSplit holds out: the same ones for a seed, never all of them."""
    k = min(records - 1, max(1, round(records * fraction)))
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    return set(torch.randperm(records, generator=g)[:k].tolist()) if k > 0 else set()


def load_dataset(spec: DatasetSpec, tokenizer, base_dir: Path | None = None,
                 limits: DataLimits | None = None, seed: int = 0) -> LoadedDataset:
    """Read, encode and count: every record becomes examples unless it has no label token; the
    validation examples come from validationPath or are held out of path (validationSplit)."""
    limits = limits or DataLimits()
    template = None
    if spec.row_format == "chat":
        try:
            template = chat_template(tokenizer, spec.chat_template)
        except ChatTemplateError as exc:
            raise DatasetError(str(exc)) from None
    encoder = row_encoder(spec, tokenizer, template)
    per_record = _read(spec, spec.path, "dataset.path", encoder, base_dir, limits)
    validation = None
    if spec.validation_split is not None:
        held = _held_out(len(per_record), spec.validation_split, seed)
        validation = [ex for i in sorted(held) for ex in per_record[i]]
        per_record = [r for i, r in enumerate(per_record) if i not in held]
    elif spec.validation_path is not None:
        validation = [ex for r in _read(spec, spec.validation_path, "dataset.validationPath", encoder, base_dir, limits)
                      for ex in r]
    if validation is not None and not validation:
        raise DatasetError("dataset: the validation data has no usable examples")
    examples = [ex for r in per_record for ex in r]
    records = len(per_record) + (len(held) if spec.validation_split is not None else 0)
    if not examples:
        what = "a completion" if spec.row_format == "prompt_completion" else "a label"
        why = f" ({records} read; none has {what} token within maxSeqLen {spec.max_seq_len})" if records else ""
        raise DatasetError(f"dataset.path: {spec.path} has no usable examples{why}")
    dropped = sum(1 for r in per_record if not r)
    return LoadedDataset(examples, records, dropped, validation, template)


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
