"""PEFT methods by name, as PEFT's ``register_peft_method``: each method's declaration module
registers itself; muxtune.facts.methods registers the built-in ones on import, before the API
builds its ``method`` values and rules from here."""
from __future__ import annotations

from muxtune.facts.methods.base import PeftMethodDecl

_METHODS: dict[str, type[PeftMethodDecl]] = {}
DEFAULT_METHOD = "lora"  # a PeftSpec's method when it names none


def register_peft_method(decl: type[PeftMethodDecl]) -> type[PeftMethodDecl]:
    """Register a declaration (usable as a class decorator). Names are unique."""
    if decl.name in _METHODS and _METHODS[decl.name] is not decl:
        raise ValueError(f"peft method {decl.name!r} is already registered")
    _METHODS[decl.name] = decl
    return decl


def peft_methods() -> tuple[type[PeftMethodDecl], ...]:
    """Every registered declaration, in registration order."""
    return tuple(_METHODS.values())


def peft_method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_peft_method(name: str) -> type[PeftMethodDecl]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"peft.method: {name!r} is not a registered method "
                         f"(registered: {', '.join(_METHODS)})") from None


def method_for_peft_type(peft_type: str) -> type[PeftMethodDecl] | None:
    """The method whose adapter directories say ``peft_type`` (PEFT's, case-insensitive), if any."""
    kind = peft_type.upper()
    return next((m for m in _METHODS.values() if m.peft_type and m.peft_type.upper() == kind), None)
