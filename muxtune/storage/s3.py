"""S3 and S3-compatible stores (MinIO, Ceph) through boto3 and its standard credential chain.

Credentials come from where every AWS tool looks: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE and the shared files, web identity, instance roles; the endpoint
from AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), with path-style addressing then, as MinIO and Ceph
expect. Downloads are size-checked before the body is read and land atomically (a temporary file
beside the target, renamed when whole), so a half-finished download never becomes a file.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from muxtune.storage.errors import StorageError, redact

CHUNK = 1 << 20


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # an object's key, or a prefix ("" for the whole bucket)

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise StorageError(f"{uri}: not an s3:// URI")
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> S3Location:
        prefix = self.key if not self.key or self.key.endswith("/") else self.key + "/"
        return S3Location(self.bucket, prefix + name)


def client():
    import boto3
    from botocore.config import Config

    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                    s3={"addressing_style": "path"} if custom else None)
    # a session per client: boto3's default session keeps the credentials it first resolved
    return boto3.session.Session().client("s3", config=config)


def _why(exc: Exception, loc: S3Location, c=None) -> str:
    """A botocore failure in words (never its request or headers, which may carry a signature)."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.NoCredentialsError):
        return "no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role)"
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return f"cannot reach the S3 endpoint ({type(exc).__name__})"
    if isinstance(exc, bx.ClientError):
        code = _code(exc)
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            if code == "NoSuchBucket" or (c is not None and not _bucket_exists(c, loc.bucket)):
                return f"bucket {loc.bucket!r} does not exist"
            return "no such object"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return f"the credentials were refused ({code})"
        if code in ("403", "AccessDenied", "Forbidden"):
            return "access denied (the credentials do not allow this)"
        if code in ("412", "PreconditionFailed"):
            return "the object changed while it was read"
        return f"the store answered {code or 'an error'}"
    if isinstance(exc, bx.BotoCoreError):
        return redact(f"{type(exc).__name__}: {exc}")
    return redact(f"{type(exc).__name__}: {exc}")


def _code(exc: Exception) -> str:
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))


def _bucket_exists(c, bucket: str) -> bool:
    try:
        c.head_bucket(Bucket=bucket)
        return True
    except Exception as exc:  # noqa: BLE001 - a 403 means it exists but is not ours to see
        return _code(exc) not in ("404", "NoSuchBucket", "NotFound")


def head(uri: str, c=None) -> dict:
    """{'size', 'etag'} of an object; StorageError naming the URI and why."""
    loc = S3Location.parse(uri)
    c = c or client()
    try:
        h = c.head_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as exc:  # noqa: BLE001 - botocore raises many kinds; all mean "this object"
        if _code(exc) == "403":  # a HEAD answer has no body: ask for one byte to learn why
            try:
                c.get_object(Bucket=loc.bucket, Key=loc.key, Range="bytes=0-0")
            except Exception as inner:  # noqa: BLE001
                exc = inner
        raise StorageError(f"{uri}: {_why(exc, loc, c)}") from None
    return {"size": int(h["ContentLength"]), "etag": h.get("ETag", "").strip('"')}


def download(uri: str, dest: Path, max_bytes: int | None = None, c=None, what: str = "object",
             expect: dict | None = None) -> dict:
    """Copy one object to dest atomically: refused before its body is read when over max_bytes,
    and cut off (nothing written) should it grow past it while streaming."""
    loc = S3Location.parse(uri)
    c = c or client()
    meta = expect or head(uri, c)
    check_cap(uri, meta["size"], max_bytes)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            _stream(c, loc, meta, f, max_bytes, uri)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta


def check_cap(uri: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise StorageError(f"{uri}: {size} bytes, larger than the dataset size cap of {max_bytes} "
                           "bytes (raise it with --max-dataset-bytes)")


def _stream(c, loc: S3Location, meta: dict, f, max_bytes: int | None, uri: str) -> None:
    try:
        kwargs = {"IfMatch": f'"{meta["etag"]}"'} if meta.get("etag") else {}
        body = c.get_object(Bucket=loc.bucket, Key=loc.key, **kwargs)["Body"]
        total = 0
        for chunk in iter(lambda: body.read(CHUNK), b""):
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise StorageError(f"{uri}: grew past the dataset size cap of {max_bytes} bytes while read "
                                   "(raise it with --max-dataset-bytes)")
            f.write(chunk)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{uri}: {_why(exc, loc, c)}") from None
    if total != meta["size"]:
        raise StorageError(f"{uri}: read {total} of {meta['size']} bytes (the transfer was cut short)")


def listing(uri: str, c=None) -> list[dict]:
    """Every object under a prefix: {'key' (relative to the prefix), 'size', 'etag'}, sorted."""
    loc = S3Location.parse(uri)
    prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
    c = c or client()
    out = []
    try:
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                rel = o["Key"][len(prefix):]
                if rel and not rel.endswith("/"):
                    out.append({"key": rel, "size": int(o["Size"]), "etag": o.get("ETag", "").strip('"')})
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{uri}: {_why(exc, loc, c)}") from None
    return sorted(out, key=lambda o: o["key"])


def files_under(root: Path, include: Callable[[Path], bool]) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not p.is_symlink() and include(rel):
            yield rel


def upload_tree(root: Path, uri: str, include: Callable[[Path], bool], last: tuple[str, ...] = (), c=None) -> list[str]:
    """Upload the files of root that include() takes to uri/<relative path>; the names in `last`
    go last, so a reader that finds them finds the rest whole. Returns the keys written."""
    base = S3Location.parse(uri)
    c = c or client()
    files = list(files_under(root, include))
    files.sort(key=lambda rel: (str(rel) in last, str(rel)))
    keys = []
    for rel in files:
        loc = base.child(rel.as_posix())
        try:
            c.upload_file(str(root / rel), loc.bucket, loc.key)
        except Exception as exc:  # noqa: BLE001 - boto3's S3UploadFailedError wraps the ClientError
            raise StorageError(f"{loc}: upload failed: {_why(getattr(exc, '__context__', None) or exc, loc, c)}") from None
        keys.append(loc.key)
    return keys
