"""The Dockerfiles (no Docker engine here to build them): base image, extras, non-root user,
entrypoint, and that they copy every folder pyproject.toml maps into the muxtune package."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers.paths import REPO

IMAGES = {"operator": "operator", "engine": "engine"}  # image -> pyproject extra


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile(image):
    ins = instructions(REPO / "images" / f"{image}.Dockerfile")
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for op, rest in ins if op == "ARG" and "=" in rest}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert all(rest.split()[0] == "${PYTHON_IMAGE}" for op, rest in ins if op == "FROM")
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert f'".[{IMAGES[image]}]"' in runs and "-c constraints.txt" in runs
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1] == "65532:65532"  # the chart's runAsUser/runAsGroup
    (entry,) = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert json.loads(entry) == ["muxtune"]
    # every source folder the image's pyproject.toml maps must be in the build context
    copied = {rest.split()[0].rstrip("/") for op, rest in ins if op == "COPY" and not rest.startswith("--from")}
    dirs = set(tomllib.loads(image_pyproject(image, ins))["tool"]["setuptools"]["package-dir"].values())
    assert dirs <= copied, f"{image}.Dockerfile does not copy {sorted(dirs - copied)}"
    ignore = (REPO / "images" / f"{image}.Dockerfile.dockerignore").read_text().split()
    assert all(f"!{d}/" in ignore for d in dirs)
    assert ("engine" in copied) == (image == "engine") and ("!engine/" in ignore) == (image == "engine")


def image_pyproject(image: str, ins: list[tuple[str, str]]) -> str:
    """pyproject.toml as the image builds it: the operator image drops the muxtune.engine packages
    (its Dockerfile's sed, applied here by the same pattern)."""
    text = (REPO / "pyproject.toml").read_text()
    if image != "operator":
        return text
    assert any(rest.startswith(f"sed -i '/{OPERATOR_DROP}/d' pyproject.toml") for op, rest in ins if op == "RUN")
    return "".join(line for line in text.splitlines(keepends=True) if not re.search(OPERATOR_DROP, line))


OPERATOR_DROP = r'"muxtune\.engine'


@pytest.mark.slow
def test_operator_wheel_builds_without_the_engine(tmp_path):
    """The operator image's context (no engine/) builds a wheel with the operator and the shared
    facts, and no engine module: what `pip install .[operator]` installs there."""
    ins = instructions(REPO / "images" / "operator.Dockerfile")
    for op, rest in ins:
        if op == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                src = src.rstrip("*")
                if (REPO / src).is_dir():
                    shutil.copytree(REPO / src, tmp_path / src, ignore=shutil.ignore_patterns("__pycache__", "go"))
                elif (REPO / src).exists():
                    shutil.copy(REPO / src, tmp_path / src)
    (tmp_path / "pyproject.toml").write_text(image_pyproject("operator", ins))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(tmp_path)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("muxtune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "muxtune/operator/memory.py" in names and "muxtune/facts/trust.py" in names
    assert "muxtune/facts/methods/lora.py" in names
    assert not [n for n in names if n.startswith("muxtune/engine/")]


def test_chart_defaults_name_these_images():
    values = yaml.safe_load((REPO / "charts" / "muxtune" / "values.yaml").read_text())
    assert values["image"]["repository"] == "ghcr.io/muxtune/operator"
    assert values["engine"]["image"]["repository"] == "ghcr.io/muxtune/engine"
    readme = (REPO / "images" / "README.md").read_text()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f"docker build -f images/operator.Dockerfile -t ghcr.io/muxtune/operator:{version} ." in readme
