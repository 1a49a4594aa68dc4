"""A task's full (unsharded) state across the group, around engine/checkpoint.py and the PEFT export.

Under pipeline parallelism each stage holds the deltas (and their AdamW state) of its own layers.
Saving gathers every stage's part on rank 0, which writes exactly what a single process writes:
the PEFT adapter, and an optimizer state indexed in single-process order. Restoring, rank 0 reads
the files and broadcasts them; each rank keeps the part for its layers. The files therefore do
not depend on the layout, and a run resumes under another dp/pp than it was saved with.

Data-parallel replicas hold identical copies: only replica 0 of each stage contributes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from muxtune.engine import checkpoint as ckpt
from muxtune.engine.peft.export import save_adapter


def param_names(rt) -> list[str]:
    """Names of the task's local parameters, in adapter.parameters() (= optimizer) order."""
    return [f"{module}.{name}" for module, delta in rt.adapter.deltas.items() for name, _ in delta.named_parameters()]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").clone()


def _local_part(rt, group) -> dict | None:
    if group.dp_rank != 0 or group.tp_rank != 0:
        return None
    names = param_names(rt)
    opt = rt.optimizer.state_dict()
    modules = [(m, {k: _cpu(v) for k, v in d.peft_state().items()}) for m, d in rt.adapter.deltas.items()]
    state = {names[i]: {k: _cpu(v) if torch.is_tensor(v) else v for k, v in s.items()} for i, s in opt["state"].items()}
    return {"stage": group.pp_rank, "names": names, "modules": modules, "state": state,
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]}


class FullState:
    """The whole task as one process would hold it; what the checkpoint and export code read."""

    def __init__(self, parts: list[dict]):
        parts = sorted((p for p in parts if p is not None), key=lambda p: p["stage"])
        self.names = [n for p in parts for n in p["names"]]
        self.modules = dict(sorted((m, s) for p in parts for m, s in p["modules"]))
        self.state = {n: s for p in parts for n, s in p["state"].items()}
        self.groups = parts[0]["groups"]

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"base_model.model.{m}.{k}": v for m, s in self.modules.items() for k, v in s.items()}

    def optimizer_state_dict(self) -> dict:
        index = {n: i for i, n in enumerate(self.names)}
        state = {index[n]: s for n, s in sorted(self.state.items(), key=lambda kv: index[kv[0]])}
        groups = [dict(g, params=list(range(len(self.names)))) for g in self.groups]
        return {"state": state, "param_groups": groups}


def gather(rt, group) -> FullState | None:
    """Collective: the task's full state on rank 0 (None elsewhere)."""
    parts = group.gather(_local_part(rt, group))
    return FullState(parts) if group.is_writer else None


class _View:
    """rt as checkpoint.save / export.save_adapter see it, with the full adapter and optimizer."""

    def __init__(self, rt, full: FullState):
        self._rt, self._full = rt, full
        self.adapter = _Adapter(rt.adapter.spec, full)
        self.optimizer = _Optimizer(full)

    def __getattr__(self, name):
        return getattr(self._rt, name)


class _Adapter:
    def __init__(self, spec, full: FullState):
        self.spec, self._full = spec, full

    def peft_state_dict(self):
        return self._full.peft_state_dict()


class _Optimizer:
    def __init__(self, full: FullState):
        self._full = full

    def state_dict(self):
        return self._full.optimizer_state_dict()


def save_checkpoint(rt, group, base_model_path: Path) -> Path | None:
    """Collective; rank 0 writes the full checkpoint and returns its path (None elsewhere)."""
    full = gather(rt, group)
    if not group.is_writer:
        return None
    return ckpt.save(_View(rt, full), base_model_path)


def save_final_adapter(rt, group, base_model_path: Path) -> None:
    """Collective; rank 0 writes the PEFT adapter of the whole task."""
    full = gather(rt, group)
    if group.is_writer:
        save_adapter(_View(rt, full).adapter, rt.out_dir, base_model_path)


class _Capture:
    """What checkpoint.restore hands a task, caught instead of applied (rank 0 reads for all)."""

    def __init__(self, rt):
        self.task, self.out_dir = rt.task, rt.out_dir
        self.adapter_state: dict = {}
        self.optimizer_state: dict = {}
        self.scheduler_state: dict = {}
        self.stream_state: dict = {}
        cap = self
        self.adapter = type("A", (), {"load_peft_state_dict": lambda _s, st: cap.adapter_state.update(st)})()
        self.optimizer = type("O", (), {"load_state_dict": lambda _s, st: cap.optimizer_state.update(st)})()
        self.scheduler = type("S", (), {"load_state_dict": lambda _s, st: cap.scheduler_state.update(st)})()
        self.stream = type("D", (), {"restore": lambda _s, st: cap.stream_state.update(st)})()
        self.adapter_device = torch.device("cpu")
        self.step = self.tokens_total = self.served_tokens = 0

    def payload(self, names: list[str]) -> dict:
        opt = self.optimizer_state
        by_name = {names[int(i)]: s for i, s in opt["state"].items()}
        return {"adapter": self.adapter_state, "optimizer": by_name,
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
                "scheduler": self.scheduler_state, "stream": self.stream_state,
                "step": self.step, "tokens_total": self.tokens_total, "served_tokens": self.served_tokens}


def read_checkpoint(rt, path: Path, names: list[str]) -> dict:
    """On rank 0: the checkpoint at path as a layout-free payload (raises on a different spec)."""
    cap = _Capture(rt)
    ckpt.restore(cap, path)
    return cap.payload(names)


def full_names(rt, group) -> list[str] | None:
    """Collective: the task's parameter names in single-process order, on rank 0."""
    parts = group.gather((group.pp_rank, param_names(rt)) if group.dp_rank == 0 and group.tp_rank == 0 else None)
    if not group.is_writer:
        return None
    return [n for _, names in sorted(p for p in parts if p is not None) for n in names]


def apply_checkpoint(rt, payload: dict) -> None:
    """Every rank: keep the part of the full state that belongs to its layers."""
    rt.adapter.load_peft_state_dict(payload["adapter"])
    names = param_names(rt)
    device = rt.adapter_device if names else torch.device("cpu")
    state = {i: {k: v.to(device) if torch.is_tensor(v) and v.dim() else v for k, v in payload["optimizer"][n].items()}
             for i, n in enumerate(names) if n in payload["optimizer"]}
    groups = [dict(g, params=list(range(len(names)))) for g in payload["groups"]]
    rt.optimizer.load_state_dict({"state": state, "param_groups": groups})
    rt.scheduler.load_state_dict(payload["scheduler"])
    rt.stream.restore(payload["stream"])
    rt.step, rt.tokens_total, rt.served_tokens = payload["step"], payload["tokens_total"], payload["served_tokens"]
