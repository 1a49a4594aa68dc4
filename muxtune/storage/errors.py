"""Storage failures, worded for a task's status: what failed and why, never a credential.

Messages travel into status.json, the task's status, Events, logs and metrics; redact() removes
the values of the credential variables (and URL user-info) from any text that came from a
library, in case a library ever echoes one.
"""
from __future__ import annotations

import os
import re

SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
                    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")


class StorageError(RuntimeError):
    """A fetch or upload failed; the message names the URI and the reason, never a secret."""


def redact(text: str) -> str:
    """text without the values of the credential variables, URL user-info or Hub tokens."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    text = _USERINFO.sub("***@", text)
    return _HF_TOKEN.sub("hf_***", text)
