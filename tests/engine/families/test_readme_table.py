"""README's table of supported families says exactly what engine/model/families.py (which the
matrix in this folder is parametrised by) says: the same families, names and paths."""
from __future__ import annotations

from muxtune.engine.model.families import FAMILIES, PATHS
from tests.helpers.paths import REPO

from .checkpoints import CONFIGS


def _table() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Supported model families"):]
    all_lines = section.splitlines()
    start = next(i for i, ln in enumerate(all_lines) if ln.startswith("| "))
    end = next(i for i in range(start, len(all_lines)) if not all_lines[i].startswith("|"))
    lines = all_lines[start:end]  # the first table of the section
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["family", "model_type", *PATHS, "notes"], head
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:] if not ln.startswith("|---")]


def test_readme_table_matches_the_registry_and_the_matrix():
    rows = {row[1].strip("`"): row for row in _table()}
    assert set(rows) == set(FAMILIES) == set(CONFIGS)
    for model_type, family in FAMILIES.items():
        row = rows[model_type]
        assert row[0] == family.name
        assert {p for p, cell in zip(PATHS, row[2:2 + len(PATHS)]) if cell == "yes"} == set(family.paths), model_type
