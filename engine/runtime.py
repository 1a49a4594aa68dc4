"""What every engine entrypoint (`muxtune run`, its ranks, `muxtune serve`) needs at start-up:
the device and dtype a flag names, a stop flag for SIGTERM/SIGINT, and a multiplexed backbone.

It imports no entrypoint, so run.py, parallel/ranks.py and serve/ can all import it and the
imports go one way (entrypoints -> runtime -> model/parallel)."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from muxtune.engine.model.backbone import MultiplexedBackbone
from muxtune.engine.model.loading import load_backbone
from muxtune.engine.model.quantize import check_layout
from muxtune.facts.quantization import NO_QUANTIZATION

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class StopFlag:
    """SIGTERM/SIGINT finish the round in flight, checkpoint, and exit.

    A second signal gives up at once; not in a rank of a group (escalate=False), whose launcher
    forwards the user's signal again and escalates to SIGKILL on its own after a grace period.
    """

    def __init__(self, escalate: bool = True):
        self.escalate = escalate
        self.signum: int | None = None
        self.event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        if self.signum is not None and self.escalate:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()

    def __call__(self) -> bool:
        return self.event.is_set()


def load_multiplexed(path: Path, device: torch.device, dtype: torch.dtype, group=None, announce=None,
                     trust_remote_code: bool = False, quantization: str = NO_QUANTIZATION) -> MultiplexedBackbone:
    """The backbone at path, multiplexed (its decoder Linears quantized when asked: QLoRA). In a
    group it is placed for this rank: loaded on the host under pipeline parallelism (only this
    rank's stage then goes to the device), then split and sharded (engine/parallel)."""
    if group is None:
        return MultiplexedBackbone(load_backbone(path, device, dtype, trust_remote_code=trust_remote_code,
                                                 quantization=quantization))
    from muxtune.engine import parallel

    check_layout(quantization, group.dims.tp, group.dims.pp)
    staged = group.dims.pp > 1
    backbone = MultiplexedBackbone(load_backbone(path, torch.device("cpu") if staged else device, dtype,
                                                 trust_remote_code=trust_remote_code, quantization=quantization))
    parallel.setup_backbone(backbone, group, device, announce=announce)
    return backbone


def install_kernels(backbone: MultiplexedBackbone, device: torch.device) -> None:
    """Fused multi-task LoRA on CUDA; MUXTUNE_LORA_KERNEL=0 keeps the per-task loop."""
    from muxtune.engine.peft import lora_kernel

    lora_kernel.install(backbone.ctx, device)
