"""Shared fixtures (helpers live in tests/helpers). Models are built and saved by the tests
themselves (no hub exists here)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.data import set_data_root, task_doc, write_jsonl
from tests.helpers.models import new_trainer
from tests.helpers.serving import tenant_api_client


@pytest.fixture(scope="session", autouse=True)
def data_root(tmp_path_factory) -> Path:
    """The data root of every trainer the tests make: pytest's base temporary directory."""
    root = tmp_path_factory.getbasetemp()
    set_data_root(root)
    return root


@pytest.fixture(scope="session", autouse=True)
def muxtune_home(tmp_path_factory) -> Path:
    """A private model cache per test session: the built-in model is generated, saved and
    loaded back through from_pretrained, exactly as on a user's first run."""
    home = Path(os.environ.get("MUXTUNE_TEST_HOME") or tmp_path_factory.mktemp("muxtune-home"))
    os.environ["MUXTUNE_HOME"] = str(home)
    return home


@pytest.fixture
def make_task():
    from muxtune.api.finetunetask import FineTuneTask

    def make(*args, **kwargs) -> FineTuneTask:
        return FineTuneTask.model_validate(task_doc(*args, **kwargs))

    return make


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "reverse.jsonl", 64, seed=1, kind="reverse")
    write_jsonl(d / "upper.jsonl", 64, seed=2, kind="upper")
    return d


@pytest.fixture(scope="session")
def tiny_backbone_dir(muxtune_home) -> Path:
    from muxtune.engine.model.loading import builtin_path

    return builtin_path("tiny-llama")


@pytest.fixture
def trainer_factory():
    return new_trainer


@pytest.fixture
def tenant_api():
    return tenant_api_client
