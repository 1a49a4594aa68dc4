"""A task's output directory across runs: whose it is, which checkpoint to trust, and how a
restarted group replays the interrupted run exactly.

- Ownership: a task that names a `metadata.uid` other than the one recorded in the directory is
  a new object under an old name (deleted and re-created): it starts fresh, as a re-created Job
  does, and the old output is moved aside, not deleted. Without a uid (local runs) nothing moves.
- Trust: the newest checkpoint whose manifest holds is resumed; the ones skipped are named in a
  warning and moved aside. A checkpoint written for another spec, or over other data (unless
  allowed), is refused with a reason naming it: that task fails, its neighbours go on.
- Exactness: the trainer checkpoints all running tasks at one round boundary (a cut: each
  checkpoint carries {"id", "members", "trainer"}). When every task of a restarted group resumes,
  the newest cut they all hold, with exactly them as members, is restored with the trainer's
  scheduler state, so the same rounds fuse the same sequences and the adapters end bitwise equal
  on CPU. Otherwise each task resumes from its own newest checkpoint (its own state is exact; the
  co-schedule, and so the last bits of the floats, may differ).

Entry points for the trainer: claim_output, read_status, resume_task (find_checkpoint +
apply_checkpoint + settle_output), start_over, save_task, align.

For a parallel engine, tensors pass only through `TaskRuntime.state_dict()` and
`load_state_dict()` (stable names, see checkpoint.py): under pipeline parallelism each stage's
state_dict() holds its own modules, and the union of the stages' dicts is the full state; under
tensor parallelism the gather to full tensors belongs around state_dict(). The writer calls
save_task(rt, ..., state=full); the other ranks call save_task(rt, ..., write=False) so that their
counters agree. resume_task is read_checkpoint + settle_output (files: the writer) and
apply_checkpoint (memory: every rank, strict=False to keep only the local modules).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from muxtune.engine.durable import checkpoint as ckpt
from muxtune.engine.durable import storage
from muxtune.engine.durable.checkpoint import TaskState
from muxtune.engine.durable.storage import CorruptError
from muxtune.facts.quantization import NO_QUANTIZATION

log = logging.getLogger("muxtune.engine")


def read_status(rt) -> dict | None:
    """status.json, or None when absent or unreadable (a warning names the file)."""
    try:
        return storage.read_json(rt.out_dir / "status.json")
    except CorruptError as exc:
        log.warning("ignoring an unreadable status file", extra={"task": rt.key, "error": str(exc)})
        return None


def _recorded_uid(rt) -> str | None:
    status = read_status(rt)
    if status and status.get("uid"):
        return status["uid"]
    good, _ = ckpt.intact(rt.out_dir)
    return good[0][1].get("uid") if good else None


def claim_output(rt) -> None:
    """Move aside an output that belongs to another object of the same name (another uid)."""
    uid = rt.task.metadata.uid
    if not uid or not rt.out_dir.exists():
        return
    old = _recorded_uid(rt)
    if old is None or old == uid:
        return
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", old)
    moved = storage.move_aside(rt.out_dir, f".replaced-{rt.out_dir.name}-{safe}")
    log.warning("output of a deleted task of the same name moved aside; starting fresh",
                extra={"task": rt.key, "uid": uid, "old_uid": old, "moved_to": str(moved)})


def save_task(rt, base_model_path: Path, cut: dict | None = None, *, state: TaskState | None = None,
              write: bool = True) -> Path:
    """Checkpoint one task (StorageError names the file). A second save at the same step, or one
    with a step half-trained, gets a -pNNNNNN name so it never overwrites an earlier cut.
    `state` defaults to rt.state_dict(); write=False only advances the task's save counters."""
    half_trained = bool(rt.pending) and len(rt.pending) < rt.task.spec.training.batch_size
    part = None if not half_trained and rt.saved_step != rt.step else rt.saves + 1
    path = ckpt.checkpoints_dir(rt.out_dir) / ckpt.dir_name(rt.step, part)
    if write:
        state = state or rt.state_dict()
        state.meta["saves"], state.meta["cut"] = rt.saves + 1, cut
        ckpt.save(rt.out_dir, state, rt.task.spec.peft, base_model_path, path.name)
    rt.saves, rt.saved_step = rt.saves + 1, rt.step
    return path


def heal_metrics(rt, step: int) -> None:
    """metrics.jsonl holds steps 1..step only (those past the checkpoint will be trained again);
    a torn last line is dropped; a bad line elsewhere fails the task, naming file and line."""
    path = rt.out_dir / "metrics.jsonl"
    if step == 0:
        if path.exists():
            path.unlink()
        return
    try:
        records = storage.read_jsonl(path)
    except CorruptError as exc:
        raise ValueError(str(exc)) from None
    kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept).encode()
    if not path.exists() or path.read_bytes() != text:
        storage.write_atomic(path, text)


def _discard_newer(rt, path: Path) -> None:
    """Keep the timeline linear: checkpoints after the one resumed would be trained again."""
    key = ckpt._order(path)
    for p in ckpt.listed(rt.out_dir):
        if ckpt._order(p) > key:
            shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(rt, path: Path, meta: dict, allow_data_change: bool) -> TaskState:
    """The state in `path` once it is allowed for this task (file side: run it where the files
    are). ValueError, naming the checkpoint, for another spec or, unless allowed, other data."""
    dataset = rt.task.spec.dataset.path
    if meta.get("spec_hash") != ckpt.spec_hash(rt.task.spec):
        raise ValueError(f"{path}: written for a different spec of {rt.key}; use another output "
                         "directory, or delete the old one to start over")
    trained_on = meta.get("quantization", NO_QUANTIZATION)  # checkpoints before QLoRA: an unquantized base
    if trained_on != rt.base_quantization:
        raise ValueError(f"{path}: trained on a base quantized as {trained_on!r}, this run loads it as "
                         f"{rt.base_quantization!r}; resume with --quantize {trained_on} (BaseModel "
                         "spec.quantization in a cluster), or use another output directory")
    state = ckpt.load(path)
    if meta.get("data_fingerprint") != rt.data_fingerprint:
        if not allow_data_change:
            raise ValueError(
                f"{path}: dataset changed since this checkpoint (dataset.path {dataset}: fingerprint "
                f"{meta.get('data_fingerprint')}, now {rt.data_fingerprint}); rerun with --allow-data-change "
                "to resume on the new data anyway, or use another output directory")
        log.warning("resuming on changed data (--allow-data-change); the step in progress restarts",
                    extra={"task": rt.key, "checkpoint": str(path), "dataset": str(dataset)})
        state.meta["in_progress"], state.grads = None, {}
    return state


def apply_checkpoint(rt, path: Path, state: TaskState, strict: bool = True) -> None:
    """Load a read_checkpoint() result into the task (memory only: every rank of a group)."""
    try:
        rt.load_state_dict(state, strict=strict)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{path}: does not fit the task: {exc}") from None
    rt.checkpoint, rt.resumed_from = str(path), path


def settle_output(rt, path: Path) -> None:
    """After apply_checkpoint(path): metrics.jsonl and the checkpoints follow it (file side)."""
    heal_metrics(rt, rt.step)
    _discard_newer(rt, path)


def _load(rt, path: Path, meta: dict, allow_data_change: bool) -> None:
    apply_checkpoint(rt, path, read_checkpoint(rt, path, meta, allow_data_change))
    settle_output(rt, path)


def find_checkpoint(rt, allow_data_change: bool = False) -> tuple[Path, TaskState, list] | None:
    """File side of resume_task: the newest intact checkpoint's (path, state, candidates for
    align), or None. Checkpoints that are not intact are moved aside; ValueError as resume_task."""
    good, bad = ckpt.intact(rt.out_dir)
    for bad_dir, exc in bad:
        log.warning("skipping a checkpoint that is not intact", extra={"task": rt.key, "error": str(exc)})
        try:  # kept for a look, out of the way of new saves and pruning
            moved = storage.move_aside(bad_dir, f".corrupt-{bad_dir.name}")
            log.warning("moved aside", extra={"task": rt.key, "path": str(bad_dir), "moved_to": str(moved)})
        except OSError:
            pass
    for i, (path, meta) in enumerate(good):
        try:
            state = read_checkpoint(rt, path, meta, allow_data_change)
        except CorruptError as exc:  # hashes held, yet it does not parse: try the one before
            log.warning("skipping a checkpoint that is not intact", extra={"task": rt.key, "error": str(exc)})
            continue
        return path, state, good[i:]
    if bad:
        log.warning("no intact checkpoint left; starting from step 0", extra={"task": rt.key})
    return None


def resume_task(rt, allow_data_change: bool = False) -> Path | None:
    """Restore the newest intact checkpoint (None: none, start at step 0). ValueError, naming the
    checkpoint, when it belongs to another spec or, unless allowed, to other data."""
    found = find_checkpoint(rt, allow_data_change)
    if found is None:
        heal_metrics(rt, 0)
        return None
    path, state, rt.resume_candidates = found  # candidates: what align() may still roll back to
    apply_checkpoint(rt, path, state)
    settle_output(rt, path)
    log.info("resumed", extra={"task": rt.key, "step": rt.step, "checkpoint": str(path)})
    return path


def start_over(rt) -> None:
    """--no-resume: train from step 0; earlier checkpoints are moved aside, not mixed with new ones."""
    heal_metrics(rt, 0)
    old = ckpt.checkpoints_dir(rt.out_dir)
    if old.exists():
        moved = storage.move_aside(old, ".checkpoints-not-resumed")
        log.warning("earlier checkpoints moved aside (--no-resume)", extra={"task": rt.key, "moved_to": str(moved)})


def align(trainer, load=None) -> bool:
    """Before a restarted group's first round: move every task to the newest cut they all hold,
    with exactly them as members, and restore the trainer's scheduler state from it.
    True when the run now replays the interrupted one exactly. `load(rt, path, meta,
    allow_data_change)` moves one task (default: here, from files; a parallel engine passes a
    collective one, every rank then calling align with the same candidates)."""
    load = load or _load
    running = sorted(trainer.active(), key=lambda rt: rt.slot)
    if not running or not any(rt.resumed_from for rt in running):
        return False
    keys = [rt.key for rt in running]
    by_task = [{m["cut"]["id"]: (p, m) for p, m in rt.resume_candidates if m.get("cut")} for rt in running]
    common = [cid for cid in by_task[0] if all(cid in c for c in by_task)
              and by_task[0][cid][1]["cut"]["members"] == keys]  # by_task[0] is newest first
    if not all(rt.resumed_from for rt in running) or not common:
        log.info("tasks resumed from their own checkpoints; the co-schedule starts anew",
                 extra={"tasks": keys})
        return False
    cid = common[0]
    for rt, cuts in zip(running, by_task):
        path, meta = cuts[cid]
        if path != rt.resumed_from:
            try:
                load(rt, path, meta, trainer.allow_data_change)
            except (CorruptError, ValueError) as exc:
                log.warning("cannot replay exactly", extra={"task": rt.key, "error": str(exc)})
                return False
    trainer.load_scheduler_state(by_task[0][cid][1]["cut"]["trainer"])
    log.info("replaying from a common checkpoint cut", extra={"cut": cid, "tasks": keys})
    return True
