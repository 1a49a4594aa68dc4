"""The muxtune cache: directories made once, process-safe and atomic, keyed by what they hold.

Built-in models (a config), s3 models (their objects' listing) and fetched datasets (an object's
ETag) all land here the same way: built in a temporary directory beside the target and renamed,
under a file lock, so concurrent first users share one copy, a half-finished download is never
found, and changed content never reuses a stale copy.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_home() -> Path:
    return Path(os.environ.get("MUXTUNE_HOME", Path.home() / ".cache" / "muxtune"))


def fingerprint(spec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_dir(area: str, name: str, spec, build: Callable[[Path], None], complete: str,
               short: bool = False) -> Path:
    """`<cache>/<area>/<name>-<hash(spec)>`, made once by build(directory); `complete` is a file
    that only a whole build has (a directory without it is never cached)."""
    root = cache_home() / area
    key = fingerprint(spec)
    target = root / f"{name}-{key[:8] if short else key}"
    if (target / complete).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / complete).exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
            try:
                build(tmp)
                if not (tmp / complete).exists():
                    raise RuntimeError(f"building {name} wrote no {complete}")
                if target.exists():  # an incomplete leftover of an older layout
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
