"""A fault only one rank sees fails that task on every rank, at the same step, and no rank hangs:
an inf weight on one pipeline stage or data-parallel replica (the loss turns non-finite), a data
file one rank cannot read. The neighbours finish."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.data import task_doc

from tests.helpers import parallel_ranks as ranks
from tests.helpers.parallel_runs import make_workdir

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dp,pp", [(1, 2), (2, 1)], ids=["pp2", "dp2"])
def test_one_rank_fault_fails_the_task_everywhere(dp, pp, tmp_path, muxtune_home):
    root = make_workdir(tmp_path, [])
    shutil.copy(root / "data" / "reverse.jsonl", root / "data" / "broken.jsonl")
    docs = [task_doc("sick", Path("data/reverse.jsonl"), steps=5, seed=1),
            task_doc("well", Path("data/upper.jsonl"), steps=5, seed=2),
            task_doc("broken", Path("data/broken.jsonl"), steps=5, seed=3)]
    views = ranks.start(2, ranks.faults, str(root), docs, dp, pp, str(muxtune_home))
    assert views[0] == views[1], views  # every rank took the same decisions
    view = views[0]
    phase, step, message = view["sick"]
    assert (phase, step) == ("Failed", 2) and "non-finite at step 3" in message
    phase, _, message = view["broken"]
    assert phase == "Failed" and "rank 1: cannot read" in message  # the rank that saw it, named everywhere
    assert view["well"][:2] == ("Succeeded", 5)
    well = next(Path(root / "out").rglob("well/adapter_model.safetensors"))
    assert well.exists()


def test_an_exception_on_rank_1_ends_with_rank_0s_status_failed(tmp_path, muxtune_home):
    """Rank 1 raises inside a round; the group ends (the launcher reports a failed rank) and rank 0,
    which writes status.json, records every task of the backbone Failed with rank 1's reason."""
    import json

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    root = make_workdir(tmp_path, [task_doc(n, Path("data/reverse.jsonl"), steps=6, seed=i)
                                   for i, n in enumerate(("a", "b"))])
    with pytest.raises(ChildFailedError):
        ranks.start(2, ranks.exception_on_rank1, str(root), 2, str(muxtune_home))
    for name in ("a", "b"):
        status = json.loads(next((root / "out").rglob(f"{name}/status.json")).read_text())
        assert status["phase"] == "Failed", status
        assert "rank 1" in status["message"] and "RuntimeError: injected on rank 1" in status["message"], status
