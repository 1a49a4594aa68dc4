"""Remote locations a task may name: the URI shapes, declared once for pydantic, CEL and the fetchers.

`s3://BUCKET/KEY` (an object), `s3://BUCKET[/PREFIX]` (a folder of objects) and
`hf://ORG/NAME[@REVISION]` (a Hugging Face Hub repository). Bucket names follow S3's rules
(3-63 lower-case letters, digits, dots and hyphens); keys never hold `..` segments, so a staged
copy's path, derived from the key, stays inside the area it is copied to.
"""
from __future__ import annotations

import re

BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
S3_OBJECT_PATTERN = rf"^s3://{BUCKET}/[^/].*$"
S3_PREFIX_PATTERN = rf"^s3://{BUCKET}(/.*)?$"
HF_REPO = r"[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*"
HF_PATTERN = rf"^hf://{HF_REPO}(@[-A-Za-z0-9_./]+)?$"
DOTDOT = r"(^|/)[.][.](/|$)"
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # a Secret holding a store's credentials

S3_OBJECT_MESSAGE = "a URI must be s3://BUCKET/KEY (the only remote scheme for data)"
S3_PREFIX_MESSAGE = "must be s3://BUCKET or s3://BUCKET/PREFIX"
DOTDOT_MESSAGE = "must not contain '..' segments"


def is_remote(value: str | None) -> bool:
    """Names a location outside the engine's areas (a URI), not a path inside them."""
    return value is not None and "://" in value


def check_s3_object(value: str) -> str:
    if not re.match(S3_OBJECT_PATTERN, value):
        raise ValueError(S3_OBJECT_MESSAGE)
    if re.search(DOTDOT, value.removeprefix("s3://")):
        raise ValueError(DOTDOT_MESSAGE)
    return value


def s3_object_rule() -> dict:
    """CEL: a value naming a URI must be an s3 object (pydantic: check_s3_object)."""
    return {"rule": f"!self.contains('://') || self.matches('{S3_OBJECT_PATTERN}')",
            "message": S3_OBJECT_MESSAGE, "reason": "FieldValueInvalid"}


def s3_prefix_rules() -> dict:
    return {"x-kubernetes-validations": [
        {"rule": f"!self.matches('{DOTDOT}')", "message": DOTDOT_MESSAGE, "reason": "FieldValueInvalid"},
    ]}
