"""`plan` dry run and the `operator` flags the Helm chart passes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.helpers.paths import CHART

TASKS = """\
apiVersion: muxtune.io/v1alpha1
kind: FineTuneTask
metadata: {name: a, namespace: team-a}
spec:
  baseModel: model:llama7b
  dataset: {path: a.jsonl}
  training: {maxSteps: 10, learningRate: 0.001}
---
apiVersion: muxtune.io/v1alpha1
kind: FineTuneTask
metadata: {name: b, namespace: team-a}
spec:
  baseModel: model:llama7b
  dataset: {path: b.jsonl}
  training: {maxSteps: 10, learningRate: 0.001}
  priority: 5
---
apiVersion: muxtune.io/v1alpha1
kind: FineTuneTask
metadata: {name: held, namespace: team-b}
spec:
  baseModel: builtin:tiny-llama
  dataset: {path: c.jsonl}
  training: {maxSteps: 10, learningRate: 0.001}
  suspend: true
---
apiVersion: muxtune.io/v1alpha1
kind: FineTuneTask
metadata: {name: unknown, namespace: team-b}
spec:
  baseModel: model:nope
  dataset: {path: c.jsonl}
  training: {maxSteps: 10, learningRate: 0.001}
"""
BASEMODEL = """\
apiVersion: muxtune.io/v1alpha1
kind: BaseModel
metadata: {name: llama7b}
spec:
  source: {hostPath: {path: /models/llama7b}}
  architecture: {parameters: 6738000000, layers: 32, hiddenSize: 4096, numAttentionHeads: 32, vocabSize: 32000}
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "tasks.yaml").write_text(TASKS)
    (tmp_path / "bm.yaml").write_text(BASEMODEL)
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump({"nodes": [
        {"name": "h100", "gpus": 8, "gpuMemoryMiB": 81920, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "count": 2}]}))
    return tmp_path


def run_plan(files, *extra):
    return subprocess.run([sys.executable, "-m", "muxtune.operator.cli", "plan", str(files / "tasks.yaml"),
                           "--nodes", str(files / "nodes.yaml"), "--basemodels", str(files / "bm.yaml"), *extra],
                          capture_output=True, text=True, timeout=60)


def test_plan_json_is_deterministic(files):
    p1, p2 = run_plan(files, "--format", "json"), run_plan(files, "--format", "json")
    assert p1.stdout == p2.stdout and p1.returncode == 1  # 1: something is unplaceable
    out = json.loads(p1.stdout)
    (g,) = out["groups"]
    assert g["members"] == ["team-a/b", "team-a/a"]  # priority first
    assert [u["task"] for u in out["unplaceable"]] == ["team-b/unknown"]  # suspended tasks are not planned
    assert out["lowerBoundGpus"] == 1 and out["gpusAllocated"] == 1


def test_plan_text(files):
    p = run_plan(files)
    assert "team-a/b, team-a/a" in p.stdout and "unplaceable team-b/unknown: ModelUnknown" in p.stdout
    assert "lower bound 1" in p.stdout


def test_plan_reads_kubernetes_nodes(files):
    from muxtune.devcluster.cluster import node_manifest

    (files / "k8s-nodes.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [
        node_manifest("n0", gpus=4, gpu_product="NVIDIA-A100-SXM4-40GB", gpu_memory_mib=40960)]}))
    p = subprocess.run([sys.executable, "-m", "muxtune.operator.cli", "plan", str(files / "tasks.yaml"),
                        "--nodes", str(files / "k8s-nodes.yaml"), "--basemodels", str(files / "bm.yaml"),
                        "--format", "json"], capture_output=True, text=True, timeout=60)
    out = json.loads(p.stdout)
    assert out["groups"][0]["gpuMemoryMiB"] == 40960


@pytest.mark.slow
def test_chart_flags_parse():
    """Every flag the chart's Deployment passes is one `muxtune operator` accepts."""
    from pydantic_settings import CliApp

    from muxtune.devcluster.build import ensure_binaries
    from muxtune.operator.cli import OperatorCommand

    helm = ensure_binaries(["helm"])["helm"]
    out = subprocess.run([str(helm), "template", "mux", str(CHART), "-n", "muxtune-system",
                          "--set", "operator.watchNamespaces={a,b}", "--set", "engine.output.pvc=out",
                          "--show-only", "templates/deployment.yaml"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    dep = yaml.safe_load(out)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["muxtune", "operator"]
    cfg = CliApp.run(OperatorCommand, cli_args=c["args"], cli_cmd_method_name="to_config")
    conf = cfg.to_config()
    assert conf.namespaces == ["a", "b"] and conf.shared_namespace == "muxtune-system"
    assert conf.metrics_port == 8080 and conf.engine_metrics_port == 9400 and conf.sharing_policy == "opt-in"
