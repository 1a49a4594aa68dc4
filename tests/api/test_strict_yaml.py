"""Task files are read as kubectl and the API server read them: duplicate keys, missing apiVersion
or kind, "4" for an integer and hostile YAML are refused with an error naming file and line,
never a traceback; what kubectl sends unchanged (10.0 as 10, dates as strings) is accepted."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import yaml

from muxtune.api import strictyaml
from muxtune.api.loader import SpecError, load_task_files

pytest_plugins = ["muxtune.devcluster.fixture"]
NAMESPACE = "muxtune-yaml-tests"

GOOD = """\
apiVersion: muxtune.io/v1alpha1
kind: FineTuneTask
metadata: {name: NAME, namespace: NS}
spec:
  baseModel: builtin:tiny-llama
  dataset: {path: data/train.jsonl}
  training:
    maxSteps: 10
    learningRate: 1.0e-4
"""

# (id, text replacing the good file's lines, accepted?, what a refusal names)
CASES = [
    ("good", lambda t: t, True, None),
    ("duplicate-key", lambda t: t.replace("    maxSteps: 10\n", "    maxSteps: 10\n    maxSteps: 99999\n"), False,
     "duplicate key 'maxSteps'"),
    ("duplicate-top-level", lambda t: t + "kind: FineTuneTask\n", False, "duplicate key 'kind'"),
    ("missing-api-version", lambda t: t.replace("apiVersion: muxtune.io/v1alpha1\n", ""), False, "apiVersion"),
    ("missing-kind", lambda t: t.replace("kind: FineTuneTask\n", ""), False, "kind"),
    ("string-for-int", lambda t: t.replace("maxSteps: 10", 'maxSteps: "10"'), False, "spec.training.maxSteps"),
    ("string-for-float", lambda t: t.replace("learningRate: 1.0e-4", 'learningRate: "0.001"'), False,
     "spec.training.learningRate"),
    ("string-for-bool", lambda t: t.replace("{path: data/train.jsonl}", '{path: data/train.jsonl, shuffle: "false"}'),
     False, "spec.dataset.shuffle"),
    ("int-for-bool", lambda t: t.replace("{path: data/train.jsonl}", "{path: data/train.jsonl, shuffle: 0}"),
     False, "spec.dataset.shuffle"),
    ("int-for-string", lambda t: t.replace("{path: data/train.jsonl}", "{path: 7}"), False, "spec.dataset.path"),
    ("whole-float-for-int", lambda t: t.replace("maxSteps: 10", "maxSteps: 10.0"), True, None),
    ("fractional-float-for-int", lambda t: t.replace("maxSteps: 10", "maxSteps: 10.5"), False, "spec.training.maxSteps"),
    ("infinite-float", lambda t: t.replace("learningRate: 1.0e-4", "learningRate: .inf"), False, "not a JSON number"),
    ("date-like-name", lambda t: t.replace("name: NAME", "name: 2024-01-01"), True, None),
]


def _text(mutate, name="probe", ns="default") -> str:
    return mutate(GOOD).replace("NAME", name).replace("NS", ns)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loader_verdicts(case, tmp_path):
    cid, mutate, ok, names = case
    path = tmp_path / "task.yaml"
    path.write_text(_text(mutate))
    if ok:
        [task] = load_task_files([path])
        assert task.spec.training.max_steps == 10 and isinstance(task.spec.training.max_steps, int)
        return
    with pytest.raises(SpecError) as err:
        load_task_files([path])
    assert str(path) in str(err.value) and names in str(err.value), str(err.value)


def test_duplicate_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(GOOD.replace("    maxSteps: 10\n", "    maxSteps: 10\n    learningRate: 5.0\n"))
    with pytest.raises(SpecError) as err:
        load_task_files([path])
    # the duplicate is on line 10, the first definition on line 9 (1-based)
    assert f"{path}:10: duplicate key 'learningRate' (first defined on line 9)" == str(err.value)


@pytest.mark.parametrize("hostile,message", [
    ("deep", "nested deeper than"),
    ("alias-bomb", "once aliases are expanded"),
    ("huge", "larger than"),
    ("binary", "not UTF-8"),
])
def test_hostile_yaml_gets_a_clear_error(hostile, message, tmp_path):
    path = tmp_path / "hostile.yaml"
    if hostile == "deep":
        path.write_text("spec: " + "[" * 20000 + "]" * 20000 + "\n")
    elif hostile == "alias-bomb":
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
        path.write_text("\n".join(lines) + "\n")
    elif hostile == "huge":
        with open(path, "wb") as f:
            f.write(b"#" * (strictyaml.MAX_FILE_BYTES + 10))
    else:
        path.write_bytes(b"\xff\xfe" + b"\x00" * 100)
    with pytest.raises(SpecError) as err:
        load_task_files([path])
    assert str(path) in str(err.value) and message in str(err.value)


def test_cli_validate_prints_one_line_no_traceback(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("spec: " + "{a: " * 20000 + "1" + "}" * 20000 + "\n")
    proc = subprocess.run([sys.executable, "-m", "muxtune.cli", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"{path}:1: nested deeper than {strictyaml.MAX_DEPTH} levels"]


def test_operator_still_parses_api_json_with_timestamps():
    """The operator validates objects from the API server (JSON strings for times) through the
    same models: strictness must not refuse them."""
    from muxtune.operator.world import parse_task

    obj = {
        "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask",
        "metadata": {"name": "t", "namespace": "ns", "uid": "u-1", "generation": 3,
                     "creationTimestamp": "2024-05-01T10:00:00Z", "resourceVersion": "12"},
        "spec": json.loads(json.dumps({"baseModel": "builtin:tiny-llama", "dataset": {"path": "d.jsonl"},
                                       "training": {"maxSteps": 5, "learningRate": 1}})),
        "status": {"phase": "Running", "startTime": "2024-05-01T10:00:01Z",
                   "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-05-01T10:00:02Z"}]},
    }
    task = parse_task(obj)
    assert not isinstance(task, str), task
    assert task.spec.training.learning_rate == 1.0
    from muxtune.api.finetunetask import FineTuneTaskStatus

    st = FineTuneTaskStatus.model_validate(obj["status"])
    assert st.start_time.year == 2024 and st.conditions[0].last_transition_time.second == 2


def _json_keeping_duplicates(text: str) -> str:
    """The YAML as JSON with every key kept, duplicates included (kubectl's own conversion drops
    them, keeping the last, so the API server never sees them through kubectl apply)."""
    loader = yaml.SafeLoader("")

    def walk(node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "{" + ",".join(f"{json.dumps(k.value)}:{walk(v)}" for k, v in node.value) + "}"
        if isinstance(node, yaml.SequenceNode):
            return "[" + ",".join(walk(v) for v in node.value) + "]"
        return json.dumps(loader.construct_object(node, deep=True), default=str)

    return walk(yaml.compose(text))


@pytest.mark.cluster
def test_kubectl_and_api_server_agree(kube_cluster, tmp_path):
    """Each case's verdict from the API server for the very same text: through `kubectl apply
    --dry-run=server` (kubectl's YAML->JSON), or, for duplicate keys, which kubectl v1.34 drops
    silently on the client, the document posted as JSON with its duplicates (the server's strict
    field validation, kubectl's default, refuses them: "duplicate field")."""
    from pathlib import Path

    from muxtune.devcluster import cluster

    cluster.apply_crds(Path(__file__).resolve().parents[2] / "crds", kubeconfig=kube_cluster.kubeconfig)
    p = kube_cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    assert p.returncode == 0 or "AlreadyExists" in p.stderr, p.stderr
    disagree = []
    for cid, mutate, ok, _ in CASES:
        name = "2024-01-01" if cid == "date-like-name" else f"y-{uuid.uuid4().hex[:8]}"
        text = _text(mutate, name, NAMESPACE).replace("name: 2024-01-01", f"name: {name}")
        if cid.startswith("duplicate"):
            body = tmp_path / f"{cid}.json"
            body.write_text(_json_keeping_duplicates(text))
            p = kube_cluster.kubectl(
                "create", "--raw", f"/apis/muxtune.io/v1alpha1/namespaces/{NAMESPACE}/finetunetasks"
                "?dryRun=All&fieldValidation=Strict", "-f", str(body), check=False)
            if not ok and "duplicate field" not in p.stderr:
                disagree.append(f"{cid}: refused for another reason: {p.stderr.strip()[:300]}")
        else:
            p = kube_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text, check=False)
        if (p.returncode == 0) != ok:
            disagree.append(f"{cid}: API server rc={p.returncode} {p.stderr.strip()[:300]}")
    assert not disagree, "\n".join(disagree)
