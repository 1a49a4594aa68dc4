"""A task's checkpoint on disk: one sealed directory per save, whole or absent.

    <task output>/checkpoints/step-00000042/           saved at a step boundary
    <task output>/checkpoints/step-00000042-p000007/   saved again at step 42, e.g. with step 43
                                                       half-trained (p: the task's save number)
        adapter_config.json, adapter_model.safetensors   a standard PEFT adapter (PeftModel loads it)
        state.safetensors   optimizer moments, accumulated gradients, RNG states, by stable name
        state.json          step, data position, LR schedule, in-progress step, fingerprints, uid, cut
        MANIFEST.json       sizes and sha256 of the above, written last (storage.write_sealed_dir)

Entry points (layout-agnostic: full, unsharded CPU tensors in and out, keyed by stable names, so
a parallel engine gathers a task's shards to one rank before `save` and scatters what `load`
returns; nothing here knows about ranks, devices or slots):
- `TaskState`: what `TaskRuntime.state_dict()` returns and `TaskRuntime.load_state_dict()` applies.
- `save(task_dir, state, spec, base_model_path, name)` -> Path, then older saves beyond KEEP go.
- `load(path)` -> TaskState, verified against its manifest; CorruptError names the file.
- `intact(task_dir)` -> newest-first [(path, meta)] and [(path, CorruptError)] of those skipped.
- `spec_hash(spec)`, `data_fingerprint(examples)`: what a checkpoint may be resumed under.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from muxtune.api.finetunetask import FineTuneTaskSpec, PeftSpec
from muxtune.engine.durable import storage
from muxtune.engine.durable.storage import CorruptError

KEEP = 2
FORMAT = 2  # 1: state.json + torch optimizer.pt, no manifest (not resumable: no manifest, no cut)
STATE_JSON, STATE_TENSORS, ADAPTER = "state.json", "state.safetensors", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_NAME = re.compile(r"^step-(\d{8})(?:-p(\d{6}))?$")


@dataclass
class TaskState:
    """A task's full training state. Tensor dicts share one naming: '<module path>.<PEFT tensor
    name>' (e.g. 'model.layers.0.self_attn.q_proj.lora_A.weight'), whatever the slot or layout."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]]  # name -> {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # accumulated by the step in progress
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> dropout generator state
    meta: dict = field(default_factory=dict)  # JSON: progress, data position, schedule, in-progress step


def spec_hash(spec: FineTuneTaskSpec) -> str:
    """What decides the training trajectory; priority, suspend and output do not."""
    relevant = spec.model_dump(mode="json", include={"base_model", "dataset", "peft", "training"})
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(examples) -> str:
    """The tokenised examples a task's stream draws from, in file order: a changed file, tokenizer
    or truncation changes it; whitespace the tokenizer never sees does not."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(len(ex.input_ids).to_bytes(4, "little"))
        h.update(array("q", ex.input_ids + ex.targets).tobytes())
    return h.hexdigest()[:16]


def checkpoints_dir(task_dir: Path) -> Path:
    return Path(task_dir) / "checkpoints"


def dir_name(step: int, part: int | None = None) -> str:
    return f"step-{step:08d}" if part is None else f"step-{step:08d}-p{part:06d}"


def _order(path: Path) -> tuple[int, int, int]:
    m = _NAME.match(path.name)
    return (int(m[1]), m[2] is not None, int(m[2] or 0))


def listed(task_dir: Path) -> list[Path]:
    """Checkpoint directories by name, oldest first (intact or not)."""
    root = checkpoints_dir(task_dir)
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=_order) if root.is_dir() else []


def _flatten(state: TaskState) -> dict[str, torch.Tensor]:
    out = {f"optim/{n}/{k}": v for n, moments in state.optimizer.items() for k, v in moments.items()}
    out.update({f"grad/{n}": v for n, v in state.grads.items()})
    out.update({f"rng/{n}": v for n, v in state.rng.items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save(task_dir: Path, state: TaskState, spec: PeftSpec, base_model_path: Path, name: str) -> Path:
    """Seal the state into checkpoints/<name>; keep the newest KEEP. StorageError names the file."""
    from muxtune.engine.peft.export import adapter_files

    files = adapter_files(state.adapter, spec, base_model_path)
    files[STATE_TENSORS] = st_save(_flatten(state))
    files[STATE_JSON] = (json.dumps({"format": FORMAT, **state.meta}, indent=2) + "\n").encode()
    root = checkpoints_dir(task_dir)
    path = storage.write_sealed_dir(root, name, files)
    for old in [p for p in listed(task_dir) if p != path][: -(KEEP - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_meta(path: Path) -> dict:
    """state.json of a sealed checkpoint (verified first); CorruptError names the file."""
    try:
        storage.verify_sealed_dir(path)
    except CorruptError:
        if not (path / storage.MANIFEST).exists() and (path / "optimizer.pt").exists():
            raise CorruptError(f"{path}: written by an older muxtune (no {storage.MANIFEST}); it cannot be resumed") from None
        raise
    meta = storage.read_json(path / STATE_JSON)
    if meta is None or meta.get("format") != FORMAT:
        raise CorruptError(f"{path / STATE_JSON}: not a format-{FORMAT} checkpoint state")
    return meta


def load(path: Path) -> TaskState:
    """The state saved in `path`, on CPU; CorruptError names the file that is wrong."""
    meta = read_meta(path)
    tensors = {}
    for fname in (ADAPTER, STATE_TENSORS):
        try:
            tensors[fname] = st_load((path / fname).read_bytes())
        except (OSError, SafetensorError) as exc:
            raise CorruptError(f"{path / fname}: {exc}") from None
    # PEFT's keys back to stable names (a prompt-tuning prompt is saved top-level, already stable)
    adapter = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors[ADAPTER].items()}
    state = TaskState(adapter=adapter, optimizer={}, meta={k: v for k, v in meta.items() if k != "format"})
    for key, value in tensors[STATE_TENSORS].items():
        kind, _, rest = key.partition("/")
        if kind == "optim":
            name, _, moment = rest.rpartition("/")
            state.optimizer.setdefault(name, {})[moment] = value
        elif kind == "grad":
            state.grads[rest] = value
        elif kind == "rng":
            state.rng[rest] = value
    return state


def intact(task_dir: Path) -> tuple[list[tuple[Path, dict]], list[tuple[Path, CorruptError]]]:
    """Checkpoints whose manifest holds, newest first, and those that do not, with the error.
    Temp directories of a write that never finished are removed on the way."""
    storage.remove_temporaries(checkpoints_dir(task_dir))
    good, bad = [], []
    for path in reversed(listed(task_dir)):
        try:
            good.append((path, read_meta(path)))
        except CorruptError as exc:
            bad.append((path, exc))
    return good, bad
