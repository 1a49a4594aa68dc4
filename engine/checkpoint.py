"""Per-task resumable checkpoints: PEFT adapter + optimizer/scheduler + data position."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from muxtune.api.finetunetask import FineTuneTaskSpec
from muxtune.engine.peft.export import load_adapter_weights, save_adapter

KEEP = 2


def spec_hash(spec: FineTuneTaskSpec) -> str:
    """What decides the training trajectory; priority, suspend and output do not."""
    relevant = spec.model_dump(mode="json", include={"base_model", "dataset", "peft", "training"})
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def checkpoints_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest(out: Path) -> Path | None:
    d = checkpoints_dir(out)
    found = sorted(p for p in d.glob("step-*") if (p / "state.json").exists()) if d.exists() else []
    return found[-1] if found else None


def save(rt, base_model_path: Path) -> Path:
    """Write to a temporary directory and rename, so a checkpoint is either whole or absent."""
    root = checkpoints_dir(rt.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{rt.step:08d}"
    tmp = root / f".tmp-step-{rt.step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(rt.adapter, tmp, base_model_path)
    torch.save({"optimizer": rt.optimizer.state_dict(), "scheduler": rt.scheduler.state_dict()}, tmp / "optimizer.pt")
    state = {
        "step": rt.step, "data": rt.stream.state(), "tokens_total": rt.tokens_total,
        "served_tokens": rt.served_tokens, "spec_hash": spec_hash(rt.task.spec),
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore(rt, path: Path) -> None:
    state = json.loads((path / "state.json").read_text())
    if state["spec_hash"] != spec_hash(rt.task.spec):
        raise ValueError(
            f"output {rt.out_dir} holds checkpoints of a different spec; "
            "use another output directory or delete it to start over"
        )
    load_adapter_weights(rt.adapter, path)
    opt = torch.load(path / "optimizer.pt", map_location=rt.adapter_device, weights_only=True)
    rt.optimizer.load_state_dict(opt["optimizer"])
    rt.scheduler.load_state_dict(opt["scheduler"])
    rt.stream.restore(state["data"])
    rt.step = int(state["step"])
    rt.tokens_total = int(state["tokens_total"])
    rt.served_tokens = int(state["served_tokens"])
