"""Fixtures for the observability tests: Debian's prometheus and promtool (scripts/install-prometheus.sh)."""
from __future__ import annotations

import os
import shutil

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _need_binary(name: str) -> str:
    """The binary's path. Missing: a failure in CI (it must have installed it), a skip on a laptop."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"`{name}` is not on PATH: run scripts/install-prometheus.sh (Debian's prometheus package, with promtool)"
    if _in_ci():
        pytest.fail(msg + "; CI must install it", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def promtool() -> str:
    return _need_binary("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _need_binary("prometheus")
