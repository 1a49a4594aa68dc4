"""Standard PEFT output: adapter_config.json + adapter_model.safetensors, loadable by PeftModel."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from muxtune.engine.backbone import TaskAdapter
from muxtune.engine.peft.registry import get_method


def save_adapter(adapter: TaskAdapter, directory: Path, base_model_path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half-written adapter."""
    directory.mkdir(parents=True, exist_ok=True)
    config = get_method(adapter.spec.method).peft_config(adapter.spec, str(base_model_path))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.peft_state_dict().items()}
    tmp = directory / ".adapter_model.safetensors.tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, directory / "adapter_model.safetensors")
    cfg = config.to_dict()
    tmp = directory / ".adapter_config.json.tmp"
    tmp.write_text(json.dumps(_jsonable(cfg), indent=2, sort_keys=True))
    os.replace(tmp, directory / "adapter_config.json")


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
