"""The folders map into one `muxtune.*` namespace and none shadows the standard library."""
from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.helpers.paths import REPO


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_source_folder_is_packaged():
    cfg = _pyproject()
    listed = set(cfg["packages"])
    for pkg, folder in cfg["package-dir"].items():
        root = REPO / folder
        assert not (root / "__init__.py").exists(), f"{folder}/ must stay an __init__-less portion"
        for d in [root, *[p for p in root.rglob("*") if p.is_dir() and "__pycache__" not in p.parts]]:
            if any(d.glob("*.py")):
                name = ".".join([pkg, *d.relative_to(root).parts])
                assert name in listed, f"{d.relative_to(REPO)} has Python files but {name} is not in pyproject packages"


def test_operator_folder_never_shadows_stdlib():
    code = "import operator, muxtune.operator; print(operator.__file__); print(operator.itemgetter)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert str(REPO / "operator") not in out.splitlines()[0]


def test_cli_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "muxtune.cli", "--help"], capture_output=True, text=True).stdout
    for cmd in ("run", "validate", "plan", "operator", "crds", "dev-cluster"):
        assert cmd in out


def test_cli_does_not_import_heavy_modules():
    """`muxtune --help` and the operator path stay light: no torch, no kopf at import."""
    code = "import sys, muxtune.cli; print(sorted(m for m in ('torch', 'kopf', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
