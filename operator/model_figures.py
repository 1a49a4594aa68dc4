"""A BaseModel's size figures: those its author typed in spec.architecture, the rest read from the
model's config.json wherever the operator can read it (muxtune/facts/config_figures.py):

* builtin: the engine generates it from a config the operator knows (muxtune/facts/builtin_models.py);
* hostPath: the directory, when it is visible where the operator runs (a single-node or dev cluster);
* hf and s3: what the model-cache Job read after staging (status.configArchitecture);
* pvc: the operator mounts no claims, so the author types the figures.

Typed figures win over read ones. When the required ones are still missing, the message names
them and says why config.json could not give them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from pydantic import ValidationError

from muxtune.api.basemodel import REQUIRED_FIGURES, Architecture, ArchitectureFigures
from muxtune.facts.builtin_models import BUILTIN_ARCHITECTURES
from muxtune.facts.config_figures import read_figures


def _wire(name: str) -> str:
    return ArchitectureFigures.model_fields[name].alias or name


def read_source_figures(bm: Mapping) -> tuple[dict, str]:
    """(figures read for this BaseModel's source, why none could be read when empty)."""
    src = ((bm.get("spec") or {}).get("source")) or {}
    if src.get("builtin"):
        arch = BUILTIN_ARCHITECTURES.get(src["builtin"])
        return (arch.model_dump(exclude_none=True), "") if arch else ({}, f"no built-in model {src['builtin']!r}")
    if src.get("hostPath"):
        path = Path(src["hostPath"].get("path") or "/")
        figures = _read_host_path(path)
        return figures, "" if figures else f"{path}/config.json is not readable where the operator runs"
    if src.get("hf") or src.get("s3"):
        status = bm.get("status") or {}
        raw = status.get("configArchitecture") or {}
        if not raw:
            return {}, ("its staging Job reported no figures from config.json" if status.get("cachePath")
                        else "the model is not staged yet; its config.json is read once it is")
        try:
            return ArchitectureFigures.model_validate(raw).model_dump(exclude_unset=True), ""
        except ValidationError:
            return {}, "the staging Job reported unusable figures"
    if src.get("pvc"):
        return {}, "the operator mounts no PersistentVolumeClaim, so it cannot read config.json from a pvc source"
    return {}, "no source"


_READ: dict[tuple[Path, int], dict] = {}  # every reconcile pass asks; read again only when config.json changes


def _read_host_path(path: Path) -> dict:
    try:
        key = (path, (path / "config.json").stat().st_mtime_ns)
    except OSError:
        return {}
    if key not in _READ:
        if len(_READ) > 1000:
            _READ.clear()
        _READ[key] = read_figures(path)
    return dict(_READ[key])


def basemodel_figures(bm: Mapping) -> tuple[Architecture | None, str]:
    """(the figures in use, or None and why: the missing fields and why config.json did not give them)."""
    raw = (bm.get("spec") or {}).get("architecture") or {}
    try:
        typed = ArchitectureFigures.model_validate(raw).model_dump(exclude_unset=True)
    except ValidationError as e:
        return None, f"spec.architecture is invalid: {e.errors()[0]['msg']}"
    read, why = read_source_figures(bm)
    merged = {**read, **typed}
    missing = [_wire(k) for k in REQUIRED_FIGURES if merged.get(k) is None]
    if missing:
        return None, (f"missing architecture figures {', '.join(missing)}: set them in spec.architecture"
                      + (f" ({why})" if why else " (config.json does not give them)"))
    try:
        return Architecture.model_validate(merged), ""
    except ValidationError as e:
        return None, f"architecture figures are invalid: {e.errors()[0]['msg']}"

