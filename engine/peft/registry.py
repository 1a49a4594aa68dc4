"""PEFT methods by FineTuneTask.spec.peft.method."""
from __future__ import annotations

from muxtune.engine.peft.base import PeftMethod
from muxtune.engine.peft.ia3 import Ia3
from muxtune.engine.peft.lora import Lora
from muxtune.engine.peft.prompt_tuning import PromptTuning

METHODS: dict[str, type[PeftMethod]] = {m.name: m for m in (Lora, Ia3, PromptTuning)}


def get_method(name: str) -> type[PeftMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"peft.method: {name!r} is not supported by this engine (supported: {', '.join(METHODS)})") from None


def matches_target(module_name: str, targets: list[str]) -> bool:
    """PEFT's rule: a target names a module exactly or is a suffix after a dot."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)
