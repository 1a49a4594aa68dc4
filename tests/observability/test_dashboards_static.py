"""Dashboard JSON that Grafana imports as intended: one Prometheus data source variable used by every
panel and target, the template variables the issue asks for, unique ids, no overlapping panels."""
from __future__ import annotations

import json

import pytest

from tests.helpers.paths import REPO

FILES = sorted((REPO / "dashboards").glob("*.json"))
WANTED_VARS = {"cluster-overview.json": ["namespace", "group"], "backbone-group.json": ["namespace", "group", "task"]}


def panels(d):
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def test_the_two_dashboards_exist():
    assert {f.name for f in FILES} == set(WANTED_VARS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dashboard_shape(path):
    d = json.loads(path.read_text())
    assert d["uid"].startswith("muxtune-") and len(d["uid"]) <= 40
    assert "muxtune" in d["tags"]
    variables = d["templating"]["list"]
    ds = [v for v in variables if v["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["name"] == "datasource" and ds[0]["query"] == "prometheus"
    names = [v["name"] for v in variables if v["type"] == "query"]
    assert names == WANTED_VARS[path.name]
    for v in variables:
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert v["multi"] and v["includeAll"] and v["allValue"] == ".*"

    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + i, g["y"] + j) for i in range(g["w"]) for j in range(g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["title"] and p.get("description"), "every panel says what it shows"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert t["expr"].strip(), p["title"]
