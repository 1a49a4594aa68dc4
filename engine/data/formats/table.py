"""Parquet files and Hugging Face `save_to_disk` directories, read through the `datasets` library.

Bounds, as for JSON lines (engine/data/datafile.py): the Parquet file must be a regular file within the
dataset size cap. A save_to_disk directory is checked before `datasets` touches it: it lies under
the data root (the caller resolved it), every file the library will open (state.json's data files,
the info files) is a regular file directly inside it (no symlink, no `..`), and their sizes sum
within the cap. A DatasetDict directory uses its `train` split (or its only one). Each string
value is held to the line cap, so a row that decompresses to gigabytes is refused by name.
"""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from muxtune.engine.data.datafile import DataFileError, DataLimits, open_regular

MAX_DISK_FILES = 10_000


def _regular_inside(directory: Path, name: str, shown: str) -> Path:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise DataFileError(f"{shown}: names a data file {name!r} outside its directory")
    p = directory / name
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise DataFileError(f"{shown}: {name} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataFileError(f"{shown}: {name} is not a regular file (symlinks and devices are not read)")
    return p


def _small_json(path: Path, limits: DataLimits, shown: str) -> dict:
    with open_regular(path, limits, shown) as f:
        raw = f.read(limits.max_line_bytes + 1)
    if len(raw) > limits.max_line_bytes:
        raise DataFileError(f"{shown}: larger than the line cap of {limits.max_line_bytes} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise DataFileError(f"{shown}: not valid JSON") from None
    if not isinstance(data, dict):
        raise DataFileError(f"{shown}: expected a JSON object")
    return data


def disk_split_dir(directory: Path, limits: DataLimits, shown: str) -> tuple[Path, str]:
    """The save_to_disk directory of one split, checked; (directory, name for errors)."""
    if not directory.is_dir():
        raise DataFileError(f"{shown}: not a directory (hf_disk reads what datasets' save_to_disk wrote)")
    dict_file = directory / "dataset_dict.json"
    if dict_file.exists():
        splits = _small_json(_regular_inside(directory, "dataset_dict.json", shown), limits, shown).get("splits")
        if not isinstance(splits, list) or not splits:
            raise DataFileError(f"{shown}/dataset_dict.json: no splits listed")
        split = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
        if split is None:
            raise DataFileError(f"{shown}: a DatasetDict without a train split ({', '.join(map(str, splits))})")
        sub = directory / str(split)
        if "/" in str(split) or str(split) in (".", "..") or sub.is_symlink() or not sub.is_dir():
            raise DataFileError(f"{shown}: split {split!r} is not a directory inside it")
        directory, shown = sub, f"{shown}/{split}"
    state = _small_json(_regular_inside(directory, "state.json", shown), limits, f"{shown}/state.json")
    files = state.get("_data_files")
    if not isinstance(files, list) or not files or len(files) > MAX_DISK_FILES:
        raise DataFileError(f"{shown}/state.json: no data files listed")
    total = 0
    for entry in files:
        name = entry.get("filename") if isinstance(entry, dict) else None
        total += os.lstat(_regular_inside(directory, name, shown)).st_size
    _regular_inside(directory, "dataset_info.json", shown)
    if total > limits.max_file_bytes:
        raise DataFileError(f"{shown}: larger than the dataset size cap of {limits.max_file_bytes} bytes "
                            "(raise it with --max-dataset-bytes)")
    return directory, shown


def _capped(row: dict, limits: DataLimits, where: str) -> dict:
    for k, v in row.items():
        if isinstance(v, str) and len(v) > limits.max_line_bytes:
            raise DataFileError(f"{where}: field {k!r} longer than the line cap of {limits.max_line_bytes} bytes")
    return row


def parquet_rows(path: Path, limits: DataLimits, shown: str) -> Iterator[tuple[str, dict]]:
    import datasets

    open_regular(path, limits, shown).close()  # regular file within the size cap, or refused unopened
    try:
        # the packaged parquet reader: datasets >= 4 runs no dataset scripts (and has no trust_remote_code)
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        it = iter(ds)
    except Exception as exc:  # noqa: BLE001 - pyarrow and datasets raise many kinds for a bad file
        raise DataFileError(f"{shown}: not a readable Parquet file: {exc}") from None
    n = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001
            raise DataFileError(f"{shown}: row {n + 1}: cannot be read: {exc}") from None
        n += 1
        yield f"{shown}: row {n}", _capped(row, limits, f"{shown}: row {n}")


def disk_rows(path: Path, limits: DataLimits, shown: str) -> Iterator[tuple[str, dict]]:
    import datasets

    directory, shown = disk_split_dir(path, limits, shown)
    try:
        ds = datasets.load_from_disk(str(directory), keep_in_memory=False)
    except Exception as exc:  # noqa: BLE001
        raise DataFileError(f"{shown}: not a readable save_to_disk directory: {exc}") from None
    for n, row in enumerate(ds, start=1):
        yield f"{shown}: row {n}", _capped(row, limits, f"{shown}: row {n}")
