"""scripts/gpu-check.sh refuses clearly where there is no GPU (what CI and this machine have);
on a CUDA machine it is the one command that runs every GPU check."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.paths import REPO

SCRIPT = REPO / "scripts" / "gpu-check.sh"


def _run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable, **env))


def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu"
    proc = _run(str(out), CUDA_VISIBLE_DEVICES="")  # hides any GPU from torch
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device is visible" in proc.stderr and "nothing was run" in proc.stderr
    assert not out.exists()


def test_needs_an_output_directory():
    proc = _run()
    assert proc.returncode == 2 and "usage: scripts/gpu-check.sh OUTDIR" in proc.stderr


def test_every_step_it_runs_exists():
    """The script names test files, bench modules and options; each must be real (a typo would
    only show on the rare GPU machine)."""
    from bench import multitask

    text = SCRIPT.read_text()
    for path in ("tests/engine/kernels/test_lora_kernel.py", "tests/engine/attention/test_attention.py"):
        assert path in text and (REPO / path).exists()
    args = multitask.parse_args(["--device", "cuda", "--n", "1", "8", "--systems", "separate", "separate-packed", "muxtune",
                                 "--steps", "6", "--warmup-steps", "2", "--repeats", "1", "--timeout", "150"])
    assert args.systems == ["separate", "separate-packed", "muxtune"]
    sys.path.insert(0, str(REPO))
    from bench import lora_kernel

    lk = lora_kernel.parse_args(["--tasks", "1,8", "--hidden", "2048,4096", "--tokens", "4096,16384", "--warmup", "3",
                                 "--iters", "10", "--json", "x.json"])
    assert lk.tasks == [1, 8]
    for fragment in ("bench.multitask --device cuda --n 1 8", "--systems separate separate-packed muxtune",
                     "bench.lora_kernel --tasks 1,8"):
        assert fragment in text.replace("\\\n    ", "")
