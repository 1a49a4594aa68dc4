"""A rank other than 0 of a serving group: it does what rank 0 decided (engine/serve/distributed.py).

It holds its part of the KV cache (its stage's layers, its tensor-parallel heads) and copies of rank
0's adapter versions in slots of its own, made from the same source (the training task's adapter
after the same step, or the adapter directory) and dropped when rank 0 drops them. It never
decides: no queue, no clock, no sampling.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from muxtune.engine.peft.export import load_adapter_weights
from muxtune.engine.serve.adapters import spec_from_peft_config
from muxtune.engine.serve.distributed import END, FORWARD, LEAVE, TRAIN, ControlChannel, GroupBroken, StageLinks
from muxtune.engine.serve.engine import ServeLimits, model_len
from muxtune.engine.serve.forward import BASE_SLOT, InferenceForward
from muxtune.engine.serve.kv_cache import KVPool


class MirroredVersions:
    """This rank's copies of rank 0's live adapter versions: rank 0's slot -> (uid, this rank's slot)."""

    def __init__(self, backbone, trainer=None):
        self.backbone, self.trainer = backbone, trainer
        self.slots: dict[int, tuple[int, int]] = {}

    def sync(self, live: dict[int, tuple[int, tuple]]) -> None:
        for slot, (uid, local) in list(self.slots.items()):
            if live.get(slot, (None,))[0] != uid:
                self._drop(slot, local)
        for slot, (uid, source) in live.items():
            if slot not in self.slots:
                self.slots[slot] = (uid, self._make(source))

    def local(self, slot: int) -> int:
        return slot if slot == BASE_SLOT else self.slots[slot][1]

    def close(self) -> None:
        for slot, (_uid, local) in list(self.slots.items()):
            self._drop(slot, local)

    def _make(self, source: tuple) -> int:
        bb = self.backbone
        kind = source[0]
        if kind == "task":
            _, key, step = source
            rt = self.trainer.tasks.get(key) if self.trainer is not None else None
            if rt is None or rt.step != step:  # the group's trainers run the same rounds: a bug if not
                raise GroupBroken(f"adapter of task {key} at step {step}: this rank has "
                                  f"{'no such task' if rt is None else f'step {rt.step}'}")
            if rt.adapter is None:  # finished and unloaded: its saved adapter, as rank 0 loads it
                return self._from_directory(rt.out_dir)
            slot = bb.new_slot()
            copy = bb.attach(slot, rt.adapter.spec, seed=0)
            with torch.no_grad():  # this rank's blocks, parameter for parameter (no re-sharding)
                for name, delta in copy.deltas.items():
                    for p, q in zip(delta.parameters(), rt.adapter.deltas[name].parameters()):
                        p.copy_(q)
            return _frozen(copy)
        if kind == "dir":
            return self._from_directory(Path(source[1]))
        raise GroupBroken(f"rank 0 serves a version of {source[1]!r} this rank never saw")

    def _from_directory(self, directory: Path) -> int:
        bb = self.backbone
        slot = bb.new_slot()
        adapter = bb.attach(slot, spec_from_peft_config(directory), seed=0)
        load_adapter_weights(adapter, directory)  # whole tensors; each rank keeps its block
        return _frozen(adapter)

    def _drop(self, slot: int, local: int) -> None:
        del self.slots[slot]
        self.backbone.detach(local)
        self.backbone.release_slot(local)


def _frozen(adapter) -> int:
    for delta in adapter.deltas.values():
        delta.requires_grad_(False)
        delta.eval()  # no dropout at inference
    return adapter.slot


class Follower:
    """The serving loop of a rank other than 0: rank 0's decisions, in order, until it leaves."""

    def __init__(self, backbone, group, limits: ServeLimits, channel: ControlChannel, trainer=None):
        self.group, self.channel, self.trainer = group, channel, trainer
        self.serves = group.dp_rank == 0  # replica 0 serves (distributed.py says why)
        if self.serves:
            pool = KVPool.for_backbone(backbone, limits.max_num_seqs, model_len(backbone.model.config, limits))
            self.forward = InferenceForward(backbone, pool)
            self.links = StageLinks(group)
            self.versions = MirroredVersions(backbone, trainer)
        self.loop = self  # what run.py drives, as rank 0's Serving.loop

    def _do(self, kind: str, payload) -> None:
        """One decision of rank 0's. A failure is recorded for the group (rank 0 reports the first
        recorded) and ends this rank: its peers' collectives then fail instead of waiting."""
        try:
            self._apply(kind, payload)
        except GroupBroken:
            raise
        except Exception as exc:
            raise GroupBroken(self.group.record_error(f"serving: {type(exc).__name__}: {exc}")) from exc

    def _apply(self, kind: str, payload) -> None:
        if kind == FORWARD:
            if self.serves:
                items, live = payload
                self.versions.sync(live)
                items = [replace(it, slot=self.versions.local(it.slot)) for it in items]
                self.links.forward(self.forward, items)
        elif kind == TRAIN:
            self.trainer.run_round(payload)

    def iteration(self) -> bool:
        """rank 0's iteration: what it decided, until it ends; whether it did anything."""
        while True:
            kind, payload = self.channel.recv()
            if kind == END:
                return bool(payload)
            if kind == LEAVE:
                raise GroupBroken("rank 0 left the serving loop in the middle of an iteration")
            self._do(kind, payload)

    def run(self, should_stop=None, until_trained: bool = False) -> None:
        """rank 0's loop (its own stop and training checks): until it leaves."""
        while True:
            kind, payload = self.channel.recv()
            if kind == LEAVE:
                return
            if kind != END:
                self._do(kind, payload)

    def wait(self, timeout: float) -> None:
        """Nothing to wait for here: the next decision comes from rank 0."""

    def close(self, reason: str = "") -> None:
        if self.serves:
            self.versions.close()
