"""Keep a path a task names inside the root it was given (data root, run output), symlinks included.

`..` segments and absolute paths are refused by the API already; a symlink inside the root that
points elsewhere is only visible on disk, so every path is resolved (symlinks followed) and must
still lie under the resolved root. Messages name the path as the task wrote it, not the root's
absolute location.
"""
from __future__ import annotations

from pathlib import Path


class PathEscapeError(ValueError):
    """A task's path leads outside its root."""


def confined(root: Path, path: str | Path, what: str, root_name: str) -> Path:
    """root/path with every symlink resolved, refused unless it stays under root (root itself too)."""
    base = Path(root).resolve()
    target = (base / path).resolve()
    if target != base and not target.is_relative_to(base):
        raise PathEscapeError(f"{what} {str(path)!r} leads outside the {root_name}")
    return target
