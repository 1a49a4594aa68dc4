"""PeftSpec's per-method field rules, generated from the method registry (muxtune.facts.methods):
the CEL rules the API server checks and the same checks in pydantic, so both refuse alike."""
from __future__ import annotations

from pydantic.alias_generators import to_camel

from muxtune.facts.methods import PeftMethodDecl, peft_methods
from muxtune.facts.methods.base import and_list as _and


def _is(method: str, default: str) -> str:
    """CEL: the spec's method is ``method`` (an absent method is the default one)."""
    if method == default:
        return f"!has(self.method) || self.method == '{method}'"
    return f"has(self.method) && self.method == '{method}'"


def _messages(m: type[PeftMethodDecl]) -> tuple[str | None, str | None]:
    """(what the method requires, which fields are its own) as users read them."""
    needs = f"method {m.name} needs {_and([to_camel(f) for f in m.requires])}" if m.requires else None
    owns = f"{_and([to_camel(f) for f in m.owns])} are for {m.name} only" if m.owns else None
    return needs, owns


def cel_rules(default: str) -> list[dict]:
    """x-kubernetes-validations for every registered method's own fields and flags."""
    rules = []
    for m in peft_methods():
        for flag in m.flags:
            f = to_camel(flag)
            rules.append({"rule": f"!has(self.{f}) || !self.{f} || {_is(m.name, default)}",
                          "message": f"{f} applies to method {m.name}", "fieldPath": f".{f}",
                          "reason": "FieldValueInvalid"})
        if m.requires or m.owns:
            needs = " && ".join(f"has(self.{to_camel(f)})" for f in m.requires) or "true"
            absent = " && ".join(f"!has(self.{to_camel(f)})" for f in m.owns) or "true"
            cond = _is(m.name, default)
            rules.append({"rule": f"{f'({cond})' if '||' in cond else cond} ? {needs} : {absent}",
                          "message": "; ".join(x for x in _messages(m) if x),
                          "fieldPath": f".{to_camel((m.requires or m.owns)[0])}", "reason": "FieldValueInvalid"})
    return rules


def check(spec) -> None:
    """pydantic's side of cel_rules: the first rule the spec breaks, as a ValueError."""
    for m in peft_methods():
        mine = spec.method == m.name
        for flag in m.flags:
            if getattr(spec, flag) and not mine:
                raise ValueError(f"{to_camel(flag)} applies to method {m.name}")
        needs, owns = _messages(m)
        if mine and any(getattr(spec, f) is None for f in m.requires):
            raise ValueError(needs)
        if not mine and any(getattr(spec, f) is not None for f in m.owns):
            raise ValueError(owns)
