"""Logs are quiet by default: third-party notices that say nothing about the run stay off stderr."""
from __future__ import annotations

import subprocess
import sys

import pytest


def test_bitsandbytes_import_notice_is_not_printed():
    """On AVX512-BF16 CPUs bitsandbytes warns at import that an optional Hub kernel is missing; PEFT
    imports it in every run, so it landed in the middle of the progress bar (can only fail on such
    a CPU: elsewhere bitsandbytes says nothing)."""
    pytest.importorskip("bitsandbytes")
    code = "from muxtune import logs; logs.configure(); import bitsandbytes"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "kernels-community" not in p.stderr, p.stderr
