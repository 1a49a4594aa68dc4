"""s3:// dataset objects as local files: a staged copy in the data area, or one in the cache.

In a cluster a staging Job (with the task's own credentials) copies each object to the staged
path inside the tenant's data area before the task joins a group; the engine, which holds no
credentials there, only reads that copy. `muxtune run` fetches the object itself into
<muxtune cache>/datasets/, keyed by bucket, key and ETag.
"""
from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

from muxtune.storage import s3
from muxtune.storage.cache import cached_dir

STAGED_DIR = ".muxtune-staged"


def staged_relpath(uri: str) -> str:
    """Where a staged copy of uri lies, relative to the data area (same for Job and engine)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return f"{STAGED_DIR}/{digest}/{PurePosixPath(uri).name}"


def stage(uri: str, data_area: Path, max_bytes: int | None) -> Path:
    """Copy one object to its staged path in data_area (atomically); returns the path."""
    dest = Path(data_area) / staged_relpath(uri)
    s3.download(uri, dest, max_bytes)
    return dest


def fetch(uri: str, max_bytes: int | None) -> Path:
    """A cached local copy of the object (downloaded when its ETag is new)."""
    c = s3.client()
    meta = s3.head(uri, c)
    s3.check_cap(uri, meta["size"], max_bytes)
    name = PurePosixPath(uri).name

    def build(directory: Path) -> None:
        s3.download(uri, directory / name, max_bytes, c=c, expect=meta)

    return cached_dir("datasets", "s3", {"uri": uri, "etag": meta["etag"], "size": meta["size"]}, build, name) / name
