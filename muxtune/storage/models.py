"""Backbones from the Hugging Face Hub (hf://ORG/NAME[@REVISION]) or a bucket (s3://BUCKET/PREFIX/).

hf:// goes through huggingface_hub's snapshot_download, so its cache (HF_HOME, HF_HUB_CACHE),
offline mode (HF_HUB_OFFLINE) and token (HF_TOKEN) behave as in every Hugging Face tool. s3://
is listed, keyed by its objects' names, sizes and ETags, and downloaded once into
<muxtune cache>/models/s3-<key>: the same content is never fetched twice, changed content never
reuses a stale copy, and a half-finished download is never found (muxtune/storage/cache.py).
"""
from __future__ import annotations

import re
from pathlib import Path

from muxtune.api import sources
from muxtune.storage import s3
from muxtune.storage.cache import cached_dir
from muxtune.storage.errors import StorageError, redact

# what a causal-LM directory needs: config, weights, tokenizer, generation config
HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def is_remote_model(base_model: str) -> bool:
    return base_model.startswith(("hf://", "s3://"))


def fetch_model(base_model: str) -> Path:
    """A local directory holding the model a hf:// or s3:// baseModel names."""
    if base_model.startswith("hf://"):
        return hf_snapshot(base_model)
    return s3_model(base_model)


def hf_snapshot(ref: str) -> Path:
    if not re.match(sources.HF_PATTERN, ref):
        raise StorageError(f"{ref}: not hf://ORG/NAME[@REVISION]")
    repo, _, revision = ref.removeprefix("hf://").partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hx

    try:
        return Path(snapshot_download(repo_id=repo, revision=revision or None, allow_patterns=HF_PATTERNS))
    except hx.GatedRepoError:
        why = "a gated repository: the token (HF_TOKEN) has no access"
    except hx.RepositoryNotFoundError:
        why = "no such repository, or it is private and HF_TOKEN does not grant it"
    except hx.RevisionNotFoundError:
        why = f"no revision {revision!r}"
    except hx.LocalEntryNotFoundError:
        why = "not in the Hub cache, and offline (HF_HUB_OFFLINE) or the Hub cannot be reached"
    except Exception as exc:  # noqa: BLE001 - network and HTTP errors of many kinds
        why = redact(f"{type(exc).__name__}: {exc}")
    raise StorageError(f"{ref}: {why}")


def s3_model(uri: str) -> Path:
    c = s3.client()
    objects = s3.listing(uri, c)
    if not any(o["key"] == "config.json" for o in objects):
        raise StorageError(f"{uri}: no config.json under this prefix ({len(objects)} objects)")
    for o in objects:
        if re.search(sources.DOTDOT, o["key"]):
            raise StorageError(f"{uri}: object {o['key']!r} has '..' segments")
    base = s3.S3Location.parse(uri)

    def build(directory: Path) -> None:
        for o in objects:
            s3.download(str(base.child(o["key"])), directory / o["key"], c=c, expect=o)

    return cached_dir("models", "s3", {"objects": objects}, build, "config.json")
