"""The single-process run that the multi-process runs must equal (helpers: tests/helpers/parallel_runs.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.parallel_runs import MUXTUNE, make_workdir, run, three_task_docs


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory, muxtune_home):
    """The three tasks trained by one process (`muxtune run`, no parallel flags); cached per session."""
    cache: dict = {}

    def get(steps_scale: int = 1, checkpoint_interval: int = 0) -> Path:
        key = (steps_scale, checkpoint_interval)
        if key not in cache:
            root = make_workdir(tmp_path_factory.mktemp("single"), three_task_docs(steps_scale, checkpoint_interval))
            proc = run([*MUXTUNE, "tasks.yaml", "--output", "out", "--no-progress"], root,
                       OMP_NUM_THREADS="2", MUXTUNE_HOME=str(muxtune_home))
            assert proc.returncode == 0, proc.stderr
            cache[key] = root / "out"
        return cache[key]

    return get
