"""Prometheus naming rules on the real registries, and dashboards/alerts that only name real metrics.

Rules: one `muxtune_` prefix; counters end in `_total` and nothing else does; base units (seconds,
bytes) and ratios in 0-1; label sets bounded (task and namespace per task, a handful of fixed
per-process labels, nothing per step, path or pod); `promtool check metrics` is clean.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import yaml

from muxtune.engine.observe.engine_metrics import PHASES, EngineMetrics, GpuSample, ProcessProbe
from muxtune.engine.observe.telemetry import RoundRecord, StageRecord, StepRecord

from tests.helpers.paths import REPO


# bounded labels each registry may use; values checked below where they are enumerable
ENGINE_TASK_LABELS = {"namespace", "task", "phase"}
ENGINE_POD_LABELS = {"kind", "gpu", "uuid", "backbone", "device", "version", "le", "stage", "dim"}
OPERATOR_LABELS = {"namespace", "phase", "verb", "resource", "le"}
SERVE_LABELS = {"model", "outcome", "slo", "status", "load", "le"}  # model: a served adapter's name (bounded)
NON_BASE_UNITS = re.compile(r"_(milli|micro|nano)?(ms|us|ns|millis|milliseconds|microseconds|minutes|hours|days|"
                            r"percent|pct|kb|mb|gb|kib|mib|gib|kilobytes|megabytes|gigabytes)(_|$)")
# NVIDIA dcgm-exporter's names the dashboards and alerts join with (its default counters file)
DCGM_NAMES = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}


class FakeProbe(ProcessProbe):
    def gpus(self):
        return [GpuSample(0, "GPU-aaaa", 8 << 30, 9 << 30, 0.5), GpuSample(1, "GPU-bbbb", 7 << 30, 9 << 30, 0.25)]


def _runtime(name, namespace, phase="Running"):
    task = SimpleNamespace(metadata=SimpleNamespace(name=name, namespace=namespace))
    return SimpleNamespace(key=f"{namespace}/{name}", name=name, task=task, phase=phase, step=0, max_steps=5,
                           message=None, last_loss=None)


def populated_engine(n_tasks: int = 3) -> EngineMetrics:
    """Every engine family with samples: tasks in several phases, rounds, steps, checkpoints, GPUs."""
    m = EngineMetrics(probe=FakeProbe())
    m._info = {"backbone": "tiny-llama", "device": "cuda", "version": "0.1.0"}
    rts = [_runtime(f"t{i}", f"ns{i % 2}") for i in range(n_tasks)]
    for rt in rts:
        m.task_phase(rt)
        m.step_done(rt, StepRecord(step=1, loss=1.5, tokens=100, label_tokens=40, lr=1e-3, grad_norm=0.7,
                                   seconds=0.5, tokens_per_second=200.0, eval_loss=1.7))
    m.round_done(RoundRecord([rts[0].key], [r.key for r in rts[1:]], 100, 128, 0.2, 900, 1000,
                             [StageRecord(0, 0.15, 0.2), StageRecord(1, 0.12, 0.2)]))
    m._dims = SimpleNamespace(dp=2, tp=1, pp=2, world_size=4)
    m.checkpoint_done(rts[0], 0.4, True)
    m.checkpoint_done(rts[0], 0.4, False)
    rts[-1].phase, rts[-1].message = "Failed", "loss became non-finite at step 2"
    m.task_phase(rts[-1])
    return m


def populated_serve():
    """Every serving family with samples: one adapter and the base model, a finished, a refused and a
    running request, an iteration that trained under serving."""
    from muxtune.engine.serve.controller import Slo, SloController
    from muxtune.engine.serve.serving_metrics import ServeMetrics

    slo = Slo(tpot_s=0.1, ttft_s=1.0)
    m = ServeMetrics(slo=slo)
    entry = SimpleNamespace(name="team-a/rev", current=SimpleNamespace(step=3))
    req = SimpleNamespace(model=entry, prompt_ids=[1] * 5, output_ids=[2] * 4, ttft=0.2, tpot=0.05)
    registry = SimpleNamespace(models=lambda: [entry], base_id="builtin:tiny-llama", live_versions=1)
    engine = SimpleNamespace(registry=registry, running=[req], waiting=[], pool=SimpleNamespace(used=1, rows=4), shed=2)
    m.attach(engine, SloController(slo, 4096))
    m.admitted(req)
    m.first_token(req)
    m.finished(req, "length")
    m.rejected(429)
    m.iteration(SimpleNamespace(seconds=0.01), {"team-a/rev": 100}, 0.05, True)
    return m


@contextmanager
def operator_registry():
    """The operator's registry with a sample in each labelled family (removed again afterwards)."""
    from muxtune.operator import metrics as om

    om.TASKS.labels("obs-test", "Running").set(1)
    om.API_REQUESTS.labels("get", "obs-test").inc(0)
    try:
        yield om.REGISTRY
    finally:
        om.TASKS.remove("obs-test", "Running")
        om.API_REQUESTS.remove("get", "obs-test")


def families(registry):
    return list(registry.collect())


def check_family(f, allowed_labels: set[str], prefix: str) -> list[str]:
    errors = []
    if not f.name.startswith(prefix) or f.name.count("muxtune") != 1:
        errors.append(f"{f.name}: must start with {prefix} (once)")
    if NON_BASE_UNITS.search(f.name):
        errors.append(f"{f.name}: use base units (seconds, bytes, ratio 0-1)")
    for s in f.samples:
        if f.type == "counter" and not s.name.endswith("_total"):
            errors.append(f"{s.name}: a counter sample must end in _total")
        if f.type != "counter" and s.name.endswith("_total"):
            errors.append(f"{s.name}: only counters end in _total")
        if f.type == "histogram" and not f.name.endswith("_seconds") and not f.name.endswith("_bytes"):
            errors.append(f"{f.name}: histograms here measure seconds or bytes, in the name")
        extra = set(s.labels) - allowed_labels
        if extra:
            errors.append(f"{s.name}: unexpected (possibly unbounded) labels {sorted(extra)}")
        if f.name.endswith("_ratio") and not math.isnan(s.value) and not 0 <= s.value <= 1:
            errors.append(f"{s.name}={s.value}: a ratio is in 0-1")
        if "phase" in s.labels and s.labels["phase"] not in PHASES:
            errors.append(f"{s.name}: phase {s.labels['phase']!r} is not one of {PHASES}")
        if "kind" in s.labels and s.labels["kind"] not in ("gpu", "host"):
            errors.append(f"{s.name}: kind {s.labels['kind']!r}")
    return errors


def test_engine_names_and_labels():
    fams = families(populated_engine().registry)
    errors = [e for f in fams for e in check_family(
        f, ENGINE_TASK_LABELS if f.name.startswith("muxtune_task_") else ENGINE_POD_LABELS, "muxtune_")]
    assert not errors, "\n".join(errors)
    names = {f.name for f in fams}
    assert all(n.startswith(("muxtune_task_", "muxtune_engine_")) for n in names)
    # the list, by its Prometheus names
    for wanted in ("muxtune_task_tokens", "muxtune_task_steps", "muxtune_task_loss", "muxtune_task_learning_rate",
                   "muxtune_task_tokens_per_second", "muxtune_task_phase", "muxtune_task_fused",
                   "muxtune_engine_step_duration_seconds", "muxtune_engine_effective_token_ratio",
                   "muxtune_engine_attention_work_ratio",
                   "muxtune_engine_real_tokens", "muxtune_engine_computed_tokens", "muxtune_engine_tasks_resident",
                   "muxtune_engine_tasks_fused", "muxtune_engine_tasks_waiting", "muxtune_engine_memory_bytes",
                   "muxtune_engine_memory_peak_bytes", "muxtune_engine_gpu_utilization_ratio",
                   "muxtune_engine_checkpoint_duration_seconds", "muxtune_engine_checkpoint_failures",
                   "muxtune_engine_stage_busy_seconds", "muxtune_engine_stage_idle_seconds",
                   "muxtune_engine_pipeline_bubble_ratio", "muxtune_engine_parallel_degree"):
        assert wanted in names, wanted


def test_engine_series_grow_with_tasks_only():
    """Per-process series are a constant; per-task series a constant per task: nothing per step."""
    def count(m):
        return sum(len(f.samples) for f in m.registry.collect())

    m2, m5 = populated_engine(2), populated_engine(5)
    per_task = (count(m5) - count(m2)) / 3
    assert per_task == int(per_task)
    m7 = populated_engine(7)
    assert count(m7) - count(m5) == 2 * per_task
    for i in range(50):  # more steps and rounds add no series
        rt = _runtime("t0", "ns0")
        m7.step_done(rt, StepRecord(step=i + 2, loss=1.0, tokens=10, label_tokens=5, lr=1e-3, grad_norm=0.5,
                                    seconds=0.1, tokens_per_second=100))
        m7.round_done(RoundRecord([rt.key], [], 10, 16, 0.01))
    assert count(m7) - count(m5) == 2 * per_task


def test_serve_names_and_labels():
    fams = families(populated_serve().registry)
    errors = [e for f in fams for e in check_family(f, SERVE_LABELS, "muxtune_serve_")]
    assert not errors, "\n".join(errors)
    names = {f.name for f in fams}
    for wanted in ("muxtune_serve_requests", "muxtune_serve_prompt_tokens", "muxtune_serve_generation_tokens",
                   "muxtune_serve_time_to_first_token_seconds", "muxtune_serve_time_per_output_token_seconds",
                   "muxtune_serve_slo_requests", "muxtune_serve_requests_waiting", "muxtune_serve_train_tokens",
                   "muxtune_serve_train_tokens_per_second"):
        assert wanted in names, wanted
    models = {s.labels["model"] for f in fams for s in f.samples if "model" in s.labels}
    assert models == {"team-a/rev", "builtin:tiny-llama"}, "one series set per served model, nothing per request"


def test_operator_names_and_labels():
    with operator_registry() as reg:
        fams = families(reg)
    errors = [e for f in fams for e in check_family(f, OPERATOR_LABELS, "muxtune_operator_")]
    assert not errors, "\n".join(errors)


def test_promtool_check_metrics(promtool):
    for body in (populated_engine().render()[0], _operator_exposition(), populated_serve().render()[0]):
        p = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
        assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), (p.stdout + p.stderr).decode()


def _operator_exposition() -> bytes:
    from prometheus_client import generate_latest

    with operator_registry() as reg:
        return generate_latest(reg)


def _known_sample_names() -> set[str]:
    names = set(DCGM_NAMES)
    with operator_registry() as op:
        for reg in (populated_engine().registry, op, populated_serve().registry):
            for f in reg.collect():
                names.update(s.name for s in f.samples)
    return names


def _exprs() -> list[tuple[str, str]]:
    out = []
    for p in sorted((REPO / "dashboards").glob("*.json")):
        d = json.loads(p.read_text())
        stack = list(d["panels"])
        while stack:
            panel = stack.pop()
            stack.extend(panel.get("panels", []))
            out += [(f"{p.name}: {panel['title']}", t["expr"]) for t in panel.get("targets", [])]
        for v in d["templating"]["list"]:
            if v["type"] == "query":
                out.append((f"{p.name}: variable {v['name']}", v["definition"]))
    for g in yaml.safe_load((REPO / "charts/muxtune/files/alerts.yaml").read_text())["groups"]:
        out += [(f"alerts: {r['alert']}", r["expr"]) for r in g["rules"]]
    return out


@pytest.mark.parametrize("where,expr", _exprs(), ids=lambda x: x if len(x) < 60 else None)
def test_queries_name_only_real_metrics(where, expr):
    """Also covers branches a CPU run cannot feed (the engine's GPU series) against typos."""
    used = set(re.findall(r"\b(muxtune_[a-z0-9_]+|DCGM_FI_[A-Z0-9_]+)\b", expr))
    assert used, f"{where}: names no metric"
    unknown = used - _known_sample_names()
    assert not unknown, f"{where}: unknown metric names {sorted(unknown)}"
