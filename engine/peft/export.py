"""Standard PEFT output: adapter_config.json + adapter_model.safetensors, loadable by PeftModel."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from muxtune.api.finetunetask import PeftSpec
from muxtune.engine.durable import storage
from muxtune.engine.model.backbone import TaskAdapter
from muxtune.engine.model.families import fan_in_fan_out
from muxtune.engine.peft.registry import get_method
from muxtune.facts.methods import get_peft_method

PEFT_PREFIX = "base_model.model."


def adapter_files(tensors: dict[str, torch.Tensor], spec: PeftSpec, base_model_path: Path) -> dict[str, bytes]:
    """PEFT's two files as bytes, from full tensors by stable name (PeftMethod.stable_name)."""
    method = get_method(spec.method)
    config = get_peft_method(spec.method).peft_config(spec, str(base_model_path))
    if hasattr(config, "fan_in_fan_out") and fan_in_fan_out(base_model_path):
        config.fan_in_fan_out = True  # Conv1D projections (GPT-2): what PEFT itself records for them
    weights = {method.peft_key(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(tensors.items())}
    return {
        "adapter_model.safetensors": st_save(weights, metadata={"format": "pt"}),
        "adapter_config.json": json.dumps(_jsonable(config.to_dict()), indent=2, sort_keys=True).encode(),
    }


def save_adapter(adapter: TaskAdapter, directory: Path, base_model_path: Path,
                 chat_template: str | None = None) -> None:
    """Each file written atomically (storage.write_atomic): a crash never leaves half an adapter.
    StorageError names the file when the disk keeps refusing. A chat task's template goes with
    it (chat_template.jinja, as transformers saves a tokenizer's), so inference renders alike."""
    tensors = {adapter.stable_name(module, name): t for module, d in adapter.deltas.items()
               for name, t in d.peft_state().items()}
    files = adapter_files(tensors, adapter.spec, base_model_path)
    if chat_template is not None:
        files["chat_template.jinja"] = chat_template.encode()
    for name, data in files.items():
        storage.write_atomic(Path(directory) / name, data)


def load_adapter_weights(adapter: TaskAdapter, directory: Path) -> None:
    adapter.load_peft_state_dict(load_file(directory / "adapter_model.safetensors"))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if hasattr(obj, "value") and not isinstance(obj, (str, int, float, bool)):
        return obj.value  # enums
    return obj
