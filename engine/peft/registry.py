"""The engine's PEFT methods by FineTuneTask.spec.peft.method: each torch implementation registers
itself against its declaration (engine/peft/base.py `implements`); importing this registers the
built-in ones."""
from __future__ import annotations

from muxtune.engine.peft import lora  # noqa: F401  isort: skip  (registration, in the declarations' order)
from muxtune.engine.peft import ia3  # noqa: F401  isort: skip
from muxtune.engine.peft import prompt_tuning  # noqa: F401  isort: skip
from muxtune.engine.peft.base import IMPLEMENTATIONS as METHODS
from muxtune.engine.peft.base import PeftMethod, matches_target  # noqa: F401  (backbone.py reads it here)


def get_method(name: str) -> type[PeftMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"peft.method: {name!r} is not supported by this engine (supported: {', '.join(METHODS)})") from None
