"""One table of bad specs, refused by pydantic AND by a real API server with the generated CRDs,
each with a message naming the field; valid specs accepted by both, with the same defaults."""
from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from muxtune.api.backbonegroup import BackboneGroup
from muxtune.api.basemodel import BaseModelResource
from muxtune.api.finetunetask import FineTuneTask
from muxtune.api.loader import SpecError, parse_task
from muxtune.api.meta import ApiModel

from tests.helpers.paths import REPO

pytest_plugins = ["muxtune.devcluster.fixture"]

NAMESPACE = "muxtune-api-tests"

MODELS: dict[str, type[ApiModel]] = {
    "FineTuneTask": FineTuneTask,
    "BaseModel": BaseModelResource,
    "BackboneGroup": BackboneGroup,
}

BASE_SPECS: dict[str, dict] = {
    "FineTuneTask": {
        "baseModel": "builtin:tiny-llama",
        "dataset": {"path": "train.jsonl"},
        "training": {"maxSteps": 10, "learningRate": 1e-4},
    },
    "BaseModel": {"source": {"builtin": "tiny-llama"}},
    "BackboneGroup": {"baseModel": "builtin:tiny-llama", "tasks": [{"name": "a", "namespace": NAMESPACE}]},
}

MISSING = object()


def _doc(kind: str, name: str) -> dict:
    meta: dict[str, Any] = {"name": name}
    if kind != "BaseModel":  # cluster-scoped
        meta["namespace"] = NAMESPACE
    return {"apiVersion": "muxtune.io/v1alpha1", "kind": kind, "metadata": meta, "spec": copy.deepcopy(BASE_SPECS[kind])}


def _set(doc: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is MISSING:
        node.pop(leaf, None)
    else:
        node[leaf] = value


@dataclass
class Case:
    id: str
    edits: dict[str, Any]  # dotted path -> new value (MISSING deletes)
    field: str  # the field path both validators must name
    kind: str = "FineTuneTask"
    extra: Callable[[dict], None] | None = field(default=None, repr=False)

    def doc(self, name: str = "probe") -> dict:
        d = _doc(self.kind, name)
        for path, value in self.edits.items():
            _set(d, path, value)
        return d


# The issue's list first (rank, method, dataset, maxSteps, learning rate, base model format), then more.
BAD: list[Case] = [
    Case("rank-zero", {"spec.peft.r": 0}, "spec.peft.r"),
    Case("rank-negative", {"spec.peft.r": -8}, "spec.peft.r"),
    Case("rank-too-big", {"spec.peft.r": 8192}, "spec.peft.r"),
    Case("rank-not-integer", {"spec.peft.r": "eight"}, "spec.peft.r"),
    # strict types, as the CRD's schema: no coercion of numeric or boolean strings
    Case("rank-numeric-string", {"spec.peft.r": "4"}, "spec.peft.r"),
    Case("learning-rate-numeric-string", {"spec.training.learningRate": "0.001"}, "spec.training.learningRate"),
    Case("shuffle-string", {"spec.dataset.shuffle": "true"}, "spec.dataset.shuffle"),
    Case("suspend-integer", {"spec.suspend": 1}, "spec.suspend"),
    Case("unknown-peft-method", {"spec.peft.method": "qlora"}, "spec.peft.method"),
    Case("missing-dataset", {"spec.dataset": MISSING}, "spec.dataset"),
    Case("dataset-without-path", {"spec.dataset": {"format": "jsonl"}}, "spec.dataset.path"),
    Case("dataset-empty-path", {"spec.dataset.path": ""}, "spec.dataset.path"),
    # paths resolve inside the namespace's own areas: nothing absolute, nothing that climbs out
    Case("dataset-absolute-path", {"spec.dataset.path": "/data/team-b/private.jsonl"}, "spec.dataset.path"),
    Case("dataset-dotdot-path", {"spec.dataset.path": "../data/team-b/private.jsonl"}, "spec.dataset.path"),
    Case("dataset-inner-dotdot-path", {"spec.dataset.path": "sets/../../team-b/x.jsonl"}, "spec.dataset.path"),
    Case("dataset-bare-dotdot", {"spec.dataset.path": ".."}, "spec.dataset.path"),
    Case("output-absolute-path", {"spec.output.path": "/output/team-b/x"}, "spec.output.path"),
    Case("output-dotdot-path", {"spec.output.path": "runs/../../team-b"}, "spec.output.path"),
    Case("dataset-unknown-format", {"spec.dataset.format": "csv"}, "spec.dataset.format"),
    Case("max-seq-len-zero", {"spec.dataset.maxSeqLen": 0}, "spec.dataset.maxSeqLen"),
    Case("max-steps-zero", {"spec.training.maxSteps": 0}, "spec.training.maxSteps"),
    Case("max-steps-negative", {"spec.training.maxSteps": -5}, "spec.training.maxSteps"),
    Case("max-steps-missing", {"spec.training.maxSteps": MISSING}, "spec.training.maxSteps"),
    Case("learning-rate-zero", {"spec.training.learningRate": 0}, "spec.training.learningRate"),
    Case("learning-rate-negative", {"spec.training.learningRate": -1e-4}, "spec.training.learningRate"),
    Case("base-model-unknown-scheme", {"spec.baseModel": "hf:meta-llama/Llama-3-8B"}, "spec.baseModel"),
    Case("base-model-bare-name", {"spec.baseModel": "llama"}, "spec.baseModel"),
    Case("base-model-uppercase-builtin", {"spec.baseModel": "builtin:Tiny"}, "spec.baseModel"),
    Case("base-model-missing", {"spec.baseModel": MISSING}, "spec.baseModel"),
    # pvc:// was never placed by the operator: weights on a claim are a BaseModel with source.pvc
    Case("base-model-pvc-scheme", {"spec.baseModel": "pvc://weights/llama"}, "spec.baseModel"),
    Case("warmup-exceeds-max-steps", {"spec.training.warmupSteps": 11}, "spec.training.warmupSteps"),
    Case("dropout-one", {"spec.peft.dropout": 1.0}, "spec.peft.dropout"),
    Case("dropout-negative", {"spec.peft.dropout": -0.1}, "spec.peft.dropout"),
    Case("alpha-zero", {"spec.peft.alpha": 0}, "spec.peft.alpha"),
    Case("no-target-modules", {"spec.peft.targetModules": []}, "spec.peft.targetModules"),
    Case(
        "feedforward-not-a-target",
        {"spec.peft.method": "ia3", "spec.peft.targetModules": ["k_proj", "v_proj"], "spec.peft.feedforwardModules": ["down_proj"]},
        "spec.peft.feedforwardModules",
    ),
    Case("unknown-schedule", {"spec.training.schedule": "step"}, "spec.training.schedule"),
    Case("batch-size-zero", {"spec.training.batchSize": 0}, "spec.training.batchSize"),
    Case("max-grad-norm-negative", {"spec.training.maxGradNorm": -1.0}, "spec.training.maxGradNorm"),
    Case("priority-out-of-range", {"spec.priority": 5000}, "spec.priority"),
    Case("misspelt-field", {"spec.peft.rank": 8}, "spec.peft.rank"),
    # data users bring, evaluation, epochs
    Case("dataset-rows-on-jsonl", {"spec.dataset.rows": "chat"}, "spec.dataset.rows"),
    Case("dataset-unknown-rows", {"spec.dataset.format": "parquet", "spec.dataset.rows": "alpaca"}, "spec.dataset.rows"),
    Case("chat-template-empty", {"spec.dataset.format": "chat", "spec.dataset.chatTemplate": ""}, "spec.dataset.chatTemplate"),
    Case("validation-path-and-split", {"spec.dataset.validationPath": "v.jsonl", "spec.dataset.validationSplit": 0.1},
         "spec.dataset.validationSplit"),
    Case("validation-split-zero", {"spec.dataset.validationSplit": 0}, "spec.dataset.validationSplit"),
    Case("validation-split-too-big", {"spec.dataset.validationSplit": 0.9}, "spec.dataset.validationSplit"),
    Case("validation-path-absolute", {"spec.dataset.validationPath": "/data/team-b/v.jsonl"}, "spec.dataset.validationPath"),
    Case("validation-path-dotdot", {"spec.dataset.validationPath": "../team-b/v.jsonl"}, "spec.dataset.validationPath"),
    Case("eval-interval-negative", {"spec.training.evalInterval": -1}, "spec.training.evalInterval"),
    Case("epochs-and-max-steps", {"spec.training.epochs": 2}, "spec.training.maxSteps"),
    Case("epochs-zero", {"spec.training.maxSteps": MISSING, "spec.training.epochs": 0}, "spec.training.epochs"),
    # PEFT methods
    Case("dora-on-ia3", {"spec.peft.method": "ia3", "spec.peft.useDora": True}, "spec.peft.useDora"),
    Case("dora-string", {"spec.peft.useDora": "true"}, "spec.peft.useDora"),
    Case("prompt-tuning-without-tokens", {"spec.peft.method": "prompt_tuning"}, "spec.peft.numVirtualTokens"),
    Case("virtual-tokens-on-lora", {"spec.peft.numVirtualTokens": 8}, "spec.peft.numVirtualTokens"),
    Case("virtual-tokens-zero", {"spec.peft.method": "prompt_tuning", "spec.peft.numVirtualTokens": 0},
         "spec.peft.numVirtualTokens"),
    Case("prompt-init-unknown", {"spec.peft.method": "prompt_tuning", "spec.peft.numVirtualTokens": 8,
                                 "spec.peft.promptTuningInit": "ZEROS"}, "spec.peft.promptTuningInit"),
    Case("prompt-init-text-without-text", {"spec.peft.method": "prompt_tuning", "spec.peft.numVirtualTokens": 8,
                                           "spec.peft.promptTuningInit": "TEXT"}, "spec.peft.promptTuningInitText"),
    Case("bad-name-underscore", {"metadata.name": "Bad_Name"}, "metadata.name"),
    Case("bad-name-dot", {"metadata.name": "a.b"}, "metadata.name"),
    Case("bad-name-too-long", {"metadata.name": "a" * 64}, "metadata.name"),
    Case("missing-spec", {"spec": MISSING}, "spec"),
    # BaseModel
    Case("model-source-none", {"spec.source": {}}, "spec.source", kind="BaseModel"),
    Case(
        "model-source-two",
        {"spec.source": {"builtin": "tiny-llama", "hostPath": {"path": "/models/x"}}},
        "spec.source",
        kind="BaseModel",
    ),
    Case("model-host-path-relative", {"spec.source": {"hostPath": {"path": "models/x"}}}, "spec.source.hostPath.path", kind="BaseModel"),
    Case("model-pvc-without-claim", {"spec.source": {"pvc": {"path": "x"}}}, "spec.source.pvc.claimName", kind="BaseModel"),
    Case("model-allowed-namespace-bad", {"spec.allowedNamespaces": ["Team_A"]}, "spec.allowedNamespaces", kind="BaseModel"),
    Case("model-selector-bad-operator", {"spec.namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Is"}]}},
         "spec.namespaceSelector.matchExpressions", kind="BaseModel"),
    Case(
        "model-zero-layers",
        {"spec.architecture": {"parameters": 1000, "layers": 0, "hiddenSize": 64}},
        "spec.architecture.layers",
        kind="BaseModel",
    ),
    Case(
        "model-unknown-dtype",
        {"spec.architecture": {"parameters": 1000, "layers": 2, "hiddenSize": 64, "dtype": "int4"}},
        "spec.architecture.dtype",
        kind="BaseModel",
    ),
    # BackboneGroup (written by the operator, but the same rules hold)
    Case("group-dp-zero", {"spec.parallelism": {"dp": 0}}, "spec.parallelism.dp", kind="BackboneGroup"),
    Case("group-negative-gpus", {"spec.gpusPerPod": -1}, "spec.gpusPerPod", kind="BackboneGroup"),
    Case("group-member-without-namespace", {"spec.tasks": [{"name": "a"}]}, "spec.tasks", kind="BackboneGroup"),
]

GOOD: list[Case] = [
    Case("minimal", {}, ""),
    Case(
        "ia3-with-feedforward",
        {"spec.peft": {"method": "ia3", "targetModules": ["k_proj", "v_proj", "down_proj"], "feedforwardModules": ["down_proj"]}},
        "",
    ),
    Case(
        "boundaries",
        {
            "metadata.name": "a" * 63,
            "spec.peft.r": 4096,
            "spec.peft.dropout": 0.99,
            "spec.training.warmupSteps": 10,
            "spec.training.learningRate": 10,
            "spec.priority": -1000,
            "spec.dataset.maxSeqLen": 131072,
        },
        "",
    ),
    Case("no-clipping-zero", {"spec.training.maxGradNorm": 0}, ""),
    # kubectl apply drops nulls (they would mean "delete"): the server keeps the null on create
    Case("no-clipping-null", {"spec.training.maxGradNorm": None}, ""),
    Case("explicit-null-optional", {"spec.output": {"path": None}}, ""),
    Case(
        "every-field",
        {
            "spec": {
                "baseModel": "model:llama-3-8b",
                "dataset": {
                    "path": "data/x.jsonl", "format": "jsonl", "promptField": "q", "completionField": "a",
                    "maxSeqLen": 1024, "trainOnPrompt": True, "shuffle": False,
                },
                "peft": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj"], "feedforwardModules": []},
                "training": {
                    "maxSteps": 100, "batchSize": 4, "learningRate": 2e-4, "schedule": "cosine", "warmupSteps": 10,
                    "weightDecay": 0.01, "maxGradNorm": 0.5, "seed": 7, "checkpointInterval": 0,
                },
                "output": {"path": "runs/x"},
                "priority": 10,
                "suspend": True,
                "shareAcrossNamespaces": True,
            }
        },
        "",
    ),
    Case("epochs-instead-of-max-steps", {"spec.training.maxSteps": MISSING, "spec.training.epochs": 3,
                                         "spec.training.warmupSteps": 50}, ""),
    Case(
        "chat-with-validation",
        {"spec.dataset": {"path": "chat.jsonl", "format": "chat", "chatTemplate": "{{ messages }}", "validationSplit": 0.1},
         "spec.training.evalInterval": 5},
        "",
    ),
    Case("parquet-text-rows", {"spec.dataset": {"path": "docs.parquet", "format": "parquet", "rows": "text",
                                                "validationPath": "val.parquet"}}, ""),
    Case("hf-disk", {"spec.dataset": {"path": "saved", "format": "hf_disk"}}, ""),
    Case("dora", {"spec.peft": {"method": "lora", "useDora": True}}, ""),
    Case("prompt-tuning", {"spec.peft": {"method": "prompt_tuning", "numVirtualTokens": 16,
                                         "promptTuningInit": "TEXT", "promptTuningInitText": "Answer briefly:"}}, ""),
    Case("dotted-names-are-not-dotdot", {"spec.dataset.path": "a..b/..x/.hidden.jsonl", "spec.output.path": "v1..2"}, ""),
    Case("base-model-resource", {"spec.baseModel": "model:llama-3.1-8b"}, ""),
    Case("base-model-local-dir", {"spec.baseModel": "./models/tiny"}, ""),
    Case("model-builtin", {}, "", kind="BaseModel"),
    Case(
        "model-pvc-with-architecture",
        {"spec": {"source": {"pvc": {"claimName": "weights", "path": "llama"}}, "architecture": {"parameters": 8_000_000_000, "layers": 32, "hiddenSize": 4096}}},
        "",
        kind="BaseModel",
    ),
    Case("model-host-path", {"spec.source": {"hostPath": {"path": "/models/llama"}}}, "", kind="BaseModel"),
    Case(
        "model-allowed-namespaces",
        {"spec.allowedNamespaces": ["team-a", "*"],
         "spec.namespaceSelector": {"matchLabels": {"team": "ml"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["gpu"]}]}},
        "",
        kind="BaseModel",
    ),
    Case("group-minimal", {}, "", kind="BackboneGroup"),
]


def names_field(text: str, path: str) -> bool:
    """The message names the field: the full path, or (for a rule on an object) the object's path
    with the field's own name in the message."""
    if path in text:
        return True
    parent, _, leaf = path.rpartition(".")
    return bool(parent) and parent in text and leaf in text


def pydantic_errors(doc: dict) -> str | None:
    """pydantic's verdict, formatted the way `muxtune validate` prints it; None when valid."""
    kind = doc.get("kind")
    if kind == "FineTuneTask":
        try:
            parse_task(doc, "probe.yaml")
        except SpecError as exc:
            return str(exc)
        return None
    from pydantic import ValidationError

    from muxtune.api.loader import format_validation_error

    try:
        MODELS[kind].model_validate(doc)
    except ValidationError as err:
        return format_validation_error("probe.yaml", err)
    return None


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_pydantic_refuses(case: Case):
    err = pydantic_errors(case.doc())
    assert err is not None, f"pydantic accepted {case.id}"
    assert names_field(err, case.field), f"pydantic's error does not name {case.field}:\n{err}"


@pytest.mark.parametrize("case", GOOD, ids=lambda c: c.id)
def test_pydantic_accepts(case: Case):
    assert pydantic_errors(case.doc()) is None


def test_bad_cases_cover_the_issue_list():
    ids = {c.id for c in BAD}
    assert {"rank-zero", "rank-negative", "unknown-peft-method", "missing-dataset", "max-steps-zero",
            "learning-rate-zero", "base-model-unknown-scheme"} <= ids


def _drop_none(v):
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_none(x) for x in v]
    return v


# ------------------------------------------------------------------------------------ real API server


@pytest.fixture(scope="module")
def api(kube_cluster):
    """The cluster with the generated CRDs installed and a namespace for the probes."""
    from muxtune.devcluster import cluster

    cluster.apply_crds(REPO / "crds", kubeconfig=kube_cluster.kubeconfig)
    p = kube_cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    assert p.returncode == 0 or "AlreadyExists" in p.stderr, p.stderr
    yield kube_cluster
    kube_cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    kube_cluster.kubectl("delete", "basemodels", "-l", "muxtune-api-test=1", "--wait=false", check=False)


def _apply(api, doc: dict, *extra: str):
    return api.kubectl("apply", "-f", "-", *extra, input=yaml.safe_dump(doc), check=False)


@pytest.mark.cluster
def test_crds_install_without_warnings(api):
    p = api.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", str(REPO / "crds"), check=False)
    assert p.returncode == 0, p.stderr
    assert "Warning" not in p.stderr, p.stderr
    for name in ("finetunetasks", "basemodels", "backbonegroups"):
        crd = json.loads(api.kubectl("get", "crd", f"{name}.muxtune.io", "-o", "json").stdout)
        conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conds.get("Established") == "True" and conds.get("NamesAccepted") == "True", conds
        assert conds.get("NonStructuralSchema") in (None, "False"), conds


@pytest.mark.cluster
@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_api_server_refuses(api, case: Case):
    name = case.edits.get("metadata.name", f"bad-{uuid.uuid4().hex[:8]}")
    doc = case.doc(name)
    if doc["kind"] == "BaseModel":
        doc["metadata"].setdefault("labels", {})["muxtune-api-test"] = "1"
    p = _apply(api, doc)
    if p.returncode == 0:  # don't leave it behind for the next case
        api.kubectl("delete", "-f", "-", "--wait=false", input=yaml.safe_dump(doc), check=False)
    assert p.returncode != 0, f"the API server accepted {case.id}: {p.stdout}"
    assert case.field in p.stderr, f"the API server's error does not name {case.field}:\n{p.stderr}"


@pytest.mark.cluster
@pytest.mark.parametrize("case", GOOD, ids=lambda c: c.id)
def test_api_server_accepts_with_pydantic_defaults(api, case: Case):
    """A server-side dry run returns the object as it would be stored: defaults applied by the
    API server must be the ones pydantic applies."""
    doc = case.doc(case.edits.get("metadata.name", f"good-{case.id}"))
    if case.id == "no-clipping-null":
        p = api.kubectl("create", "-f", "-", "--dry-run=server", "-o", "json", input=yaml.safe_dump(doc), check=False)
    else:
        p = _apply(api, doc, "--dry-run=server", "-o", "json")
    assert p.returncode == 0, f"the API server refused {case.id}:\n{p.stderr}"
    assert "Warning" not in p.stderr, p.stderr
    stored = json.loads(p.stdout)
    expected = MODELS[doc["kind"]].model_validate(doc).to_wire()["spec"]
    assert _drop_none(stored["spec"]) == expected
    if case.id == "no-clipping-null":  # null kept, not replaced by the default 1.0
        assert stored["spec"]["training"]["maxGradNorm"] is None


@pytest.mark.cluster
def test_created_task_has_defaults_and_columns(api):
    doc = _doc("FineTuneTask", "columns")
    p = _apply(api, doc)
    assert p.returncode == 0, p.stderr
    stored = json.loads(api.kubectl("get", "ftt", "columns", "-n", NAMESPACE, "-o", "json").stdout)
    assert stored["spec"]["peft"] == {"method": "lora", "r": 8, "alpha": 16, "dropout": 0, "targetModules": ["q_proj", "v_proj"],
                                      "feedforwardModules": [], "useDora": False}
    assert stored["spec"]["training"]["maxGradNorm"] == 1 and stored["spec"]["output"] == {}

    status = {"phase": "Running", "group": "grp-1", "step": 5, "totalSteps": 10, "progress": "5/10",
              "loss": 1.25, "tokensPerSecond": 1234.5, "message": "training"}
    api.kubectl("patch", "ftt", "columns", "-n", NAMESPACE, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": status}))
    out = api.kubectl("get", "ftt", "columns", "-n", NAMESPACE).stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "GROUP", "PROGRESS", "LOSS", "TOKENS/S", "AGE"]
    assert out[1].split()[:6] == ["columns", "Running", "grp-1", "5/10", "1.25", "1234.5"]
    wide = api.kubectl("get", "ftt", "columns", "-n", NAMESPACE, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-3:] == ["BASE", "METHOD", "MESSAGE"]
    assert wide[1].split()[-3:] == ["builtin:tiny-llama", "lora", "training"]
    # the category and the short name
    assert "finetunetask.muxtune.io/columns" in api.kubectl("get", "muxtune", "-n", NAMESPACE, "-o", "name").stdout

    # the status is validated too, with the same rules
    bad = api.kubectl("patch", "ftt", "columns", "-n", NAMESPACE, "--subresource=status", "--type=merge",
                      "-p", json.dumps({"status": {"phase": "Exploded"}}), check=False)
    assert bad.returncode != 0 and "status.phase" in bad.stderr, bad.stderr
    api.kubectl("delete", "ftt", "columns", "-n", NAMESPACE)


# spec edits after creation: (field the error must name, merge patch of spec)
IMMUTABLE_EDITS = [
    ("spec.baseModel", {"baseModel": "builtin:small-llama"}),
    ("spec.dataset", {"dataset": {"path": "other.jsonl"}}),
    ("spec.peft", {"peft": {"r": 16}}),
    ("spec.training", {"training": {"maxSteps": 99}}),
    ("spec.output", {"output": {"path": "elsewhere"}}),
    ("spec.shareAcrossNamespaces", {"shareAcrossNamespaces": True}),
]


@pytest.mark.cluster
def test_api_server_refuses_spec_changes_but_not_scheduling_ones(api):
    """What a task trains is fixed once it exists; priority and suspend (Kueue's switch) are not."""
    doc = _doc("FineTuneTask", "immutable")
    assert _apply(api, doc).returncode == 0
    try:
        for path, patch in IMMUTABLE_EDITS:
            p = api.kubectl("patch", "ftt", "immutable", "-n", NAMESPACE, "--type=merge",
                            "-p", json.dumps({"spec": patch}), check=False)
            assert p.returncode != 0, f"the API server let {path} change: {p.stdout}"
            assert path in p.stderr and "immutable" in p.stderr, p.stderr
        for patch in ({"priority": 500}, {"suspend": True}, {"suspend": False}):
            p = api.kubectl("patch", "ftt", "immutable", "-n", NAMESPACE, "--type=merge",
                            "-p", json.dumps({"spec": patch}), check=False)
            assert p.returncode == 0, p.stderr
        stored = json.loads(api.kubectl("get", "ftt", "immutable", "-n", NAMESPACE, "-o", "json").stdout)["spec"]
        assert (stored["priority"], stored["suspend"], stored["baseModel"]) == (500, False, "builtin:tiny-llama")
        # re-applying the same manifest (what GitOps tools do every sync) is not a change
        assert _apply(api, doc).returncode == 0
    finally:
        api.kubectl("delete", "ftt", "immutable", "-n", NAMESPACE, "--wait=false", check=False)


@pytest.mark.cluster
def test_backbonegroup_and_basemodel_columns(api):
    doc = _doc("BackboneGroup", "grp-cols")
    doc["spec"]["tasks"].append({"name": "b", "namespace": NAMESPACE})
    assert _apply(api, doc).returncode == 0
    api.kubectl("patch", "bbg", "grp-cols", "-n", NAMESPACE, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"phase": "Running", "taskCount": 2, "gpus": 4, "readyPods": 1,
                                             "podsReady": "1/2", "layout": "dp2 x tp2 x pp1", "restarts": 0}}))
    out = api.kubectl("get", "bbg", "grp-cols", "-n", NAMESPACE).stdout.splitlines()
    assert out[0].split() == ["NAME", "BASE", "MODEL", "TASKS", "GPUS", "PODS", "PHASE", "AGE"]
    assert out[1].split()[:6] == ["grp-cols", "builtin:tiny-llama", "2", "4", "1/2", "Running"]
    wide = api.kubectl("get", "bbg", "grp-cols", "-n", NAMESPACE, "-o", "wide").stdout
    assert "LAYOUT" in wide and "dp2 x tp2 x pp1" in wide and "RESTARTS" in wide
    api.kubectl("delete", "bbg", "grp-cols", "-n", NAMESPACE)

    bm = _doc("BaseModel", "tiny-cols")
    bm["metadata"]["labels"] = {"muxtune-api-test": "1"}
    assert _apply(api, bm).returncode == 0
    api.kubectl("patch", "bm", "tiny-cols", "--subresource=status", "--type=merge", "-p",
                json.dumps({"status": {"ready": True, "architecture": {"parameters": 1000, "layers": 2, "hiddenSize": 64}}}))
    out = api.kubectl("get", "bm", "tiny-cols").stdout.splitlines()
    assert out[0].split() == ["NAME", "READY", "PARAMETERS", "DTYPE", "AGE"]
    assert out[1].split()[:4] == ["tiny-cols", "true", "1000", "bfloat16"]
    api.kubectl("delete", "bm", "tiny-cols")


def _explain(api, what: str, deadline: float) -> str:
    # OpenAPI for a new CRD is published a moment after it is Established.
    while True:
        p = api.kubectl("explain", what, check=False)
        if p.returncode == 0 or time.monotonic() > deadline:
            assert p.returncode == 0, p.stderr
            return p.stdout
        time.sleep(1)


@pytest.mark.cluster
def test_kubectl_explain_shows_descriptions(api):
    deadline = time.monotonic() + 60
    peft = _explain(api, "finetunetask.spec.peft", deadline)
    assert "PEFT method and hyperparameters." in peft
    flat = " ".join(peft.split())  # explain wraps long descriptions
    for line in ("LoRA rank.", "ia3 or prompt_tuning", "Dropout on the adapter input.", "weight-decomposed LoRA"):
        assert line in flat, peft
    assert "no clipping" in _explain(api, "ftt.spec.training.maxGradNorm", deadline)
    assert "exactly one of builtin, pvc, hostPath" in _explain(api, "basemodel.spec.source", deadline).replace("\n", " ")
    assert "Member tasks." in _explain(api, "backbonegroup.spec", deadline)
