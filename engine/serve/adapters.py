"""Which adapters the server answers for, and which frozen version of each a request gets.

A name is a training task of this process (its metadata.name; namespace/name when the task has
a namespace, as in a cluster) or a finished adapter directory (adapter_config.json +
adapter_model.safetensors). Every version a request uses is a frozen copy of the adapter's
weights in a slot of its own in the multiplexed layers, taken between training rounds, so it is
the adapter exactly as it stood after an optimizer step; requests hold a reference on their
version for their whole generation and a version no request holds is freed once it is no longer
the newest. The live training deltas are never read by a forward of the server.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.model.backbone import MultiplexedBackbone, TaskAdapter
from muxtune.engine.peft.registry import get_method
from muxtune.engine.serve.forward import BASE_SLOT
from muxtune.facts.methods import method_for_peft_type, peft_methods
from muxtune.facts.methods.base import and_list

log = logging.getLogger("muxtune.serve")
SERVABLE = ("Running", "Succeeded")


class AdapterError(ValueError):
    """An adapter directory that cannot be served; the message says why."""


class NameTaken(AdapterError):
    """Another adapter (or the base model) is already served under that name."""


class Unavailable(Exception):
    """The named adapter exists but cannot serve now (its task failed or left)."""


@dataclass
class AdapterVersion:
    model: str
    slot: int
    adapter: TaskAdapter | None  # None: the base model
    step: int | None  # the optimizer step it reflects (None: a fixed adapter from files)
    refs: int = 0

    @property
    def virtual_tokens(self) -> int:
        """Prompt tuning's virtual positions in front of every request (0 for other methods)."""
        return self.adapter.spec.virtual_tokens if self.adapter is not None else 0


@dataclass
class ServedModel:
    """One name in /v1/models."""

    name: str
    root: str  # where the weights come from: a directory, or task:<namespace/name>
    task_key: str | None = None
    path: Path | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    phase: str | None = None  # the task's phase (training tasks only)
    step: int | None = None
    current: AdapterVersion | None = None
    removed: bool = False  # unloaded (POST /v1/unload_lora_adapter): queued requests for it get 404


def spec_from_peft_config(directory: Path) -> PeftSpec:
    """The PeftSpec of a PEFT adapter directory; features the multiplexed layers do not implement are refused."""
    path = Path(directory) / "adapter_config.json"
    if not (Path(directory) / "adapter_model.safetensors").exists() or not path.exists():
        raise AdapterError(f"{directory}: not an adapter directory (needs adapter_config.json and adapter_model.safetensors)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: cannot read: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: not a JSON object")
    kind = str(cfg.get("peft_type", "")).upper()
    decl = method_for_peft_type(kind)
    targets = cfg.get("target_modules")
    if decl is not None and decl.attaches == "linear" and not isinstance(targets, list):
        raise AdapterError(f"{path}: target_modules must be a list of module names (got {targets!r})")

    def refuse_if(cond: bool, what: str):
        if cond:
            raise AdapterError(f"{path}: {what} is not supported by the multiplexed layers")

    refuse_if(bool(cfg.get("modules_to_save")), "modules_to_save")
    refuse_if(cfg.get("layers_to_transform") is not None, "layers_to_transform")
    if decl is None:
        served = [m.name for m in peft_methods() if m.peft_type]
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not served ({and_list(served)} are)")
    unsupported = next(decl.unsupported_peft_features(cfg), None)
    refuse_if(unsupported is not None, str(unsupported))
    try:
        return PeftSpec(method=decl.name, **decl.spec_fields(cfg))
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: not a valid {decl.title} adapter_config.json: {exc}") from None


def check_shapes(adapter: TaskAdapter, state: dict) -> None:
    """Every tensor the adapter needs is in the file with its exact shape (copy_ would broadcast a
    wrong one silently); ValueError names the first that is not."""
    key = get_method(adapter.spec.method).peft_key
    for module, delta in adapter.deltas.items():
        if delta.shard is not None:
            continue  # a tensor-parallel shard takes its block of the whole tensor
        for name, param in delta.peft_state().items():
            k = key(adapter.stable_name(module, name))
            if k not in state:
                raise ValueError(f"{k} is missing from adapter_model.safetensors")
            if tuple(state[k].shape) != tuple(param.shape):
                raise ValueError(f"{k} has shape {tuple(state[k].shape)}, this backbone needs {tuple(param.shape)}")


def served_name(task) -> str:
    """What clients call a task's adapter: its name, or namespace/name when it has a namespace."""
    ns = task.metadata.namespace
    return f"{ns}/{task.metadata.name}" if ns else task.metadata.name


class AdapterRegistry:
    """Names and versions. The engine thread changes it; the HTTP thread only reads `models()` and `lookup()`."""

    def __init__(self, backbone: MultiplexedBackbone, base_id: str, trainer=None, only_enabled: bool = False):
        self.backbone = backbone
        self.base_id = base_id
        self.trainer = trainer
        self.only_enabled = only_enabled  # serve only tasks with spec.serving.enabled (as in a cluster)
        self._lock = threading.Lock()
        self._models: dict[str, ServedModel] = {}
        self._aliases: dict[str, str] = {}  # task key (namespace/name) -> served name
        self._versions: dict[int, AdapterVersion] = {}  # slot -> live version
        self._calls: queue.Queue = queue.Queue()  # (fn, Future) to run on the engine thread
        self.base = ServedModel(name=base_id, root=str(backbone.path))

    # ----- names ------------------------------------------------------------------------------
    def add_directory(self, name: str, directory: Path) -> ServedModel:
        """Load a finished adapter now, so a bad directory fails at startup with its reason."""
        if name in self._models or name == self.base_id:
            raise NameTaken(f"two adapters would be served as {name!r}")
        entry = ServedModel(name=name, root=str(Path(directory).resolve()), path=Path(directory))
        entry.current = self._load(name, Path(directory))
        with self._lock:
            self._models[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Stop serving an adapter loaded from a directory (engine thread); requests holding its
        version finish on it, queued ones get 404, and its slot is freed once none holds it."""
        with self._lock:
            entry = self._models.get(name)
            if entry is None or entry.task_key is not None:
                raise KeyError(name)
            del self._models[name]
        entry.removed = True
        if entry.current is not None and entry.current.refs == 0:
            self._free(entry.current)

    def call(self, fn) -> Future:
        """Run fn on the engine thread between iterations (changes to the layers must not race a
        forward); the caller wakes the engine and waits on the future."""
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut

    def _run_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - the caller gets it
                    fut.set_exception(exc)

    def sync_tasks(self) -> None:
        """Follow the trainer's tasks (engine thread, between rounds): new ones appear, phases update;
        adapter loads and unloads asked for over HTTP run here."""
        self._run_calls()
        if self.trainer is None:
            return
        with self._lock:
            for name, entry in list(self._models.items()):  # a task removed from the run is no longer served
                if entry.task_key is not None and entry.task_key not in self.trainer.tasks:
                    del self._models[name]
                    self._aliases.pop(entry.task_key, None)
            for key, rt in list(self.trainer.tasks.items()):
                name = served_name(rt.task)
                entry = self._models.get(name)
                if self.only_enabled and not rt.task.spec.serving.enabled:
                    if entry is not None and entry.task_key == key:  # serving turned off: no new requests
                        del self._models[name]
                        self._aliases.pop(key, None)
                    continue
                if entry is None or entry.task_key != key:
                    if entry is not None and entry.task_key is None:
                        continue  # an adapter directory already has that name
                    entry = self._models[name] = ServedModel(name=name, root=f"task:{key}", task_key=key,
                                                             path=rt.out_dir)
                    self._aliases[key] = name
                entry.phase, entry.step = rt.phase, rt.step

    def served_tasks(self) -> dict[str, dict]:
        """For the engine's /v1/status: {task key: {"servedModel": name}} of the tasks answering now."""
        with self._lock:
            return {m.task_key: {"servedModel": m.name} for m in self._models.values()
                    if m.task_key is not None and m.phase in SERVABLE}

    def models(self) -> list[ServedModel]:
        with self._lock:
            return [m for m in self._models.values() if m.task_key is None or m.phase in SERVABLE]

    def lookup(self, name: str) -> ServedModel | None:
        """The entry a request names (None: unknown). A task that cannot serve raises Unavailable."""
        if name == self.base_id:
            return self.base
        with self._lock:
            entry = self._models.get(name) or self._models.get(self._aliases.get(name, ""))
            if entry is None:
                return None
            if entry.task_key is not None and entry.phase not in SERVABLE:
                raise Unavailable(f"adapter {name!r} is not served: its task is {entry.phase}")
            return entry

    # ----- versions (engine thread) ------------------------------------------------------------
    def acquire(self, entry: ServedModel) -> AdapterVersion:
        """A reference on the newest version of entry's adapter, snapshotting it if training moved on."""
        if entry is self.base:
            return AdapterVersion(self.base_id, BASE_SLOT, None, None, refs=1)
        if entry.removed:
            raise Unavailable(f"adapter {entry.name!r} was unloaded")
        if entry.task_key is not None:
            rt = self.trainer.tasks.get(entry.task_key) if self.trainer else None
            if rt is None or rt.phase not in SERVABLE:
                raise Unavailable(f"adapter {entry.name!r} is not served: its task is "
                                  f"{rt.phase if rt else 'no longer in this process'}")
            if entry.current is None or entry.current.step != rt.step:
                old = entry.current
                entry.current = (self._snapshot(entry.name, rt.adapter, rt.step) if rt.adapter is not None
                                 else self._load(entry.name, rt.out_dir, step=rt.step))
                if old is not None and old.refs == 0:
                    self._free(old)
        entry.current.refs += 1
        return entry.current

    def release(self, version: AdapterVersion) -> None:
        version.refs -= 1
        if version.slot == BASE_SLOT or version.refs > 0:
            return
        with self._lock:
            current = any(m.current is version for m in self._models.values())
        if not current:
            self._free(version)

    @property
    def live_versions(self) -> int:
        return len(self._versions)

    def _snapshot(self, name: str, source: TaskAdapter, step: int) -> AdapterVersion:
        slot = self.backbone.new_slot()
        copy = self.backbone.attach(slot, source.spec, seed=0)
        copy.load_peft_state_dict(source.peft_state_dict())
        return self._freeze(name, slot, copy, step)

    def _load(self, name: str, directory: Path, step: int | None = None) -> AdapterVersion:
        spec = spec_from_peft_config(directory)
        slot = self.backbone.new_slot()
        try:
            adapter = self.backbone.attach(slot, spec, seed=0)
            state = load_file(Path(directory) / "adapter_model.safetensors")
            check_shapes(adapter, state)
            adapter.load_peft_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - a bad file (safetensors' own errors too) loses nothing
            self.backbone.detach(slot)
            self.backbone.release_slot(slot)
            raise AdapterError(f"{directory}: cannot load onto this backbone: {exc}") from None
        return self._freeze(name, slot, adapter, step)

    def _freeze(self, name: str, slot: int, adapter: TaskAdapter, step: int | None) -> AdapterVersion:
        for delta in adapter.deltas.values():
            delta.requires_grad_(False)
            delta.eval()  # no dropout at inference
        version = AdapterVersion(name, slot, adapter, step)
        self._versions[slot] = version
        log.debug("adapter version ready", extra={"model": name, "slot": slot, "step": step})
        return version

    def _free(self, version: AdapterVersion) -> None:
        if self._versions.pop(version.slot, None) is None:
            return
        self.backbone.detach(version.slot)
        self.backbone.release_slot(version.slot)
