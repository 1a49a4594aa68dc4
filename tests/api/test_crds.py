"""crds/*.yaml are generated from the pydantic models, are structural, and default like pydantic."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from muxtune.api import crdgen
from muxtune.api.backbonegroup import BackboneGroup
from muxtune.api.basemodel import BaseModelResource
from muxtune.api.finetunetask import FineTuneTask

from tests.helpers.paths import REPO

CRDS = REPO / "crds"

# Keys a structural schema (as the API server accepts it) may not carry, or that mean the
# generator leaked pydantic's JSON-schema dialect.
FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "const", "title", "discriminator"}


def test_crd_files_are_generated_from_the_models():
    stale = crdgen.diff_files(CRDS)
    assert not stale, f"crds/ is out of date with muxtune/api ({stale}): run `muxtune crds` (or `python -m muxtune.api.crdgen`)"


def test_render_is_deterministic():
    assert crdgen.render_all() == crdgen.render_all()


def test_check_command_fails_on_drift(tmp_path: Path, capsys):
    out = tmp_path / "crds"
    crdgen.CrdsCommand(out=out, chart=None).cli_cmd()
    crdgen.CrdsCommand(out=out, chart=None, check=True).cli_cmd()  # in sync: returns
    (out / "finetunetasks.yaml").write_text("# stale\n")
    (out / "stray.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as exc:
        crdgen.CrdsCommand(out=out, chart=None, check=True).cli_cmd()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "finetunetasks.yaml" in err and "stray.yaml" in err


def _crd(kind: str) -> dict:
    (res,) = [r for r in crdgen.RESOURCES if r.kind == kind]
    return yaml.safe_load((CRDS / res.filename).read_text())


def _schema(kind: str) -> dict:
    return _crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node: dict, path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


KINDS = [r.kind for r in crdgen.RESOURCES]


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind):
    for path, node in _walk(_schema(kind)):
        assert not FORBIDDEN & node.keys(), f"{kind}{path}: {sorted(FORBIDDEN & node.keys())}"
        assert "type" in node, f"{kind}{path}: every node has a type in a structural schema"
        assert "x-kubernetes-preserve-unknown-fields" not in node, f"{kind}{path}: nothing here needs unknown fields"
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node:
                assert node[key] is True, f"{kind}{path}: OpenAPI v3 {key} is a boolean"
                assert ("minimum" if key == "exclusiveMinimum" else "maximum") in node
        if node.get("nullable"):
            assert node.get("default") is not None, f"{kind}{path}: nullable only where null differs from absent"
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("rule") and rule.get("message"), f"{kind}{path}: CEL rule without a message"


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_has_a_description(kind):
    """`kubectl explain` shows these; metadata is the API server's own (no description allowed)."""
    missing = [
        path
        for path, node in _walk(_schema(kind))
        if path and path != ".metadata" and not path.endswith("[]") and not node.get("description")
    ]
    assert not missing, f"{kind}: fields without a description: {missing}"


def test_names_scopes_and_subresources():
    want = {
        "FineTuneTask": ("finetunetasks", "Namespaced", ["ftt"]),
        "BaseModel": ("basemodels", "Cluster", ["bm"]),
        "BackboneGroup": ("backbonegroups", "Namespaced", ["bbg"]),
    }
    for kind, (plural, scope, short) in want.items():
        crd = _crd(kind)
        assert crd["metadata"]["name"] == f"{plural}.muxtune.io"
        spec = crd["spec"]
        assert spec["group"] == "muxtune.io" and spec["scope"] == scope
        assert spec["names"]["kind"] == kind and spec["names"]["plural"] == plural
        assert spec["names"]["shortNames"] == short and spec["names"]["categories"] == ["muxtune"]
        (version,) = spec["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}


def _resolve(schema: dict, json_path: str) -> dict | None:
    node = schema
    for part in json_path.strip(".").split("."):
        if part == "metadata" and node is schema:
            return {"type": "object"}  # .metadata.creationTimestamp: the server's own
        node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_point_at_real_fields(kind):
    version = _crd(kind)["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for col in version["additionalPrinterColumns"]:
        node = _resolve(schema, col["jsonPath"])
        assert node is not None, f"{kind} column {col['name']}: {col['jsonPath']} is not in the schema"
        if col["type"] in ("integer", "number", "boolean") and "type" in node and node is not schema:
            assert node["type"] == col["type"], f"{kind} column {col['name']}: {node['type']} vs {col['type']}"


def test_finetunetask_columns():
    cols = [c["name"] for c in _crd("FineTuneTask")["spec"]["versions"][0]["additionalPrinterColumns"] if not c.get("priority")]
    assert cols == ["Phase", "Group", "Progress", "Loss", "Tokens/s", "Age"]
    cols = [c["name"] for c in _crd("BackboneGroup")["spec"]["versions"][0]["additionalPrinterColumns"] if not c.get("priority")]
    assert cols == ["Base Model", "Tasks", "GPUs", "Pods", "Phase", "Age"]


def test_cross_field_rules_are_cel():
    spec = _schema("FineTuneTask")["properties"]["spec"]["properties"]
    rules = {
        "peft": spec["peft"]["x-kubernetes-validations"],
        "training": spec["training"]["x-kubernetes-validations"],
        "source": _schema("BaseModel")["properties"]["spec"]["properties"]["source"]["x-kubernetes-validations"],
    }
    assert "targetModules" in rules["peft"][0]["rule"]
    assert "maxSteps" in rules["training"][0]["rule"]
    assert "hostPath" in rules["source"][0]["rule"]


# ---------------------------------------------------------------- defaulting, as the API server does it


def apply_defaults(schema: dict, value):
    """Kubernetes' structural defaulting: absent properties with a default get it, top-down."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


MINIMAL = {
    "FineTuneTask": (
        FineTuneTask,
        {
            "baseModel": "builtin:tiny-llama",
            "dataset": {"path": "train.jsonl"},
            "training": {"maxSteps": 10, "learningRate": 1e-4},
        },
    ),
    "BaseModel": (BaseModelResource, {"source": {"builtin": "tiny-llama"}}),
    "BackboneGroup": (BackboneGroup, {"baseModel": "builtin:tiny-llama", "tasks": [{"name": "a", "namespace": "ns"}]}),
}


@pytest.mark.parametrize("kind", KINDS)
def test_crd_defaults_equal_pydantic_defaults(kind):
    model, spec = MINIMAL[kind]
    schema = _schema(kind)["properties"]["spec"]
    server_side = apply_defaults(schema, spec)
    pydantic_side = model.model_validate({"metadata": {"name": "x"}, "spec": spec}).to_wire()["spec"]
    assert server_side == pydantic_side


def test_status_defaults_equal_pydantic_defaults():
    from muxtune.api.finetunetask import FineTuneTaskStatus

    schema = _schema("FineTuneTask")["properties"]["status"]
    assert apply_defaults(schema, {}) == FineTuneTaskStatus().to_wire()
