"""EngineMetrics tells the truth about a real multiplexed run, and its series stay bounded."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from muxtune.engine.observe.engine_metrics import PHASES, EngineMetrics, GpuSample, ProcessProbe


def val(m: EngineMetrics, name: str, **labels):
    return m.registry.get_sample_value(name, labels)


def task_series(m: EngineMetrics, key: str) -> list:
    ns, name = key.split("/")
    return [s for f in m.registry.collect() for s in f.samples
            if s.labels.get("namespace") == ns and s.labels.get("task") == name]


class FakeProbe(ProcessProbe):
    def __init__(self, gpus=()):
        super().__init__()
        self._gpus = list(gpus)

    def gpus(self):
        return self._gpus


def fake_runtime(name="t", namespace="team-a", phase="Running", step=0, max_steps=10, message=None, last_loss=None):
    task = SimpleNamespace(metadata=SimpleNamespace(name=name, namespace=namespace))
    return SimpleNamespace(key=f"{namespace}/{name}", name=name, task=task, phase=phase, step=step,
                           max_steps=max_steps, message=message, last_loss=last_loss)


def test_phases_match_the_engine():
    from muxtune.engine import task

    assert PHASES == (task.PENDING, task.RUNNING, task.SUCCEEDED, task.FAILED, task.SUSPENDED)


def test_real_run_counts_match_the_trainer(trainer_factory, make_task, data_dir, tmp_path):
    """Two tasks over one tiny backbone with a token budget small enough that they take turns."""
    trainer = trainer_factory(tmp_path / "out", token_budget=96)
    m = EngineMetrics()
    m.attach(trainer)
    trainer.telemetry = m
    tasks = [make_task("rev", data_dir / "reverse.jsonl", steps=4, batch=4, checkpointInterval=2),
             make_task("up", data_dir / "upper.jsonl", steps=3, batch=4, seed=3)]
    for t in tasks:
        trainer.add_task(t)
    assert val(m, "muxtune_engine_tasks_resident") == 2
    assert val(m, "muxtune_task_phase", namespace="default", task="rev", phase="Running") == 1
    trainer.run()

    real = 0
    for t in tasks:
        rt = trainer.tasks[t.key]
        lab = {"namespace": "default", "task": rt.name}
        assert val(m, "muxtune_task_tokens_total", **lab) == rt.tokens_total > 0
        assert val(m, "muxtune_task_steps_total", **lab) == rt.max_steps
        assert val(m, "muxtune_task_step", **lab) == val(m, "muxtune_task_max_steps", **lab) == rt.max_steps
        assert val(m, "muxtune_task_loss", **lab) == pytest.approx(rt.last_loss)
        assert val(m, "muxtune_task_learning_rate", **lab) > 0
        assert val(m, "muxtune_task_tokens_per_second", **lab) > 0
        assert val(m, "muxtune_task_grad_norm", **lab) > 0
        assert val(m, "muxtune_task_last_progress_timestamp_seconds", **lab) > 1.6e9
        for p in PHASES:
            assert val(m, "muxtune_task_phase", phase=p, **lab) == (1 if p == "Succeeded" else 0)
        assert val(m, "muxtune_task_fused", **lab) == 0  # finished: no longer in any forward
        assert val(m, "muxtune_task_fused_rounds_total", **lab) >= rt.max_steps
        real += rt.tokens_total
    # every real token went through the backbone exactly once, in some task's step
    assert val(m, "muxtune_engine_real_tokens_total") == real == trainer.real_tokens
    assert val(m, "muxtune_engine_computed_tokens_total") == trainer.computed_tokens >= real
    assert 0 < val(m, "muxtune_engine_effective_token_ratio") <= 1
    assert 0 < val(m, "muxtune_engine_attention_work_ratio") <= 1
    assert val(m, "muxtune_engine_step_duration_seconds_count") == trainer.rounds
    waited = sum(val(m, "muxtune_task_waiting_rounds_total", namespace="default", task=t.metadata.name) for t in tasks)
    assert waited > 0, "a 96-token budget must have left a task out of some forward"
    assert val(m, "muxtune_engine_tasks_resident") == 0
    assert val(m, "muxtune_engine_tasks_fused") == val(m, "muxtune_engine_tasks_waiting") == 0
    # rev: at steps 2 and 4 (final); up: the final one; plus each running neighbour saved with a
    # checkpoint (rev's step 2) or a finish (up's), as one cut: every save counted once
    saves = sum(trainer.tasks[t.key].saves for t in tasks)
    assert val(m, "muxtune_engine_checkpoint_duration_seconds_count") == saves >= 3
    assert val(m, "muxtune_engine_checkpoint_failures_total") == 0
    assert val(m, "muxtune_engine_info", backbone=trainer.backbone.path.name, device="cpu",
               version=m._info["version"]) == 1
    assert val(m, "muxtune_engine_memory_bytes", kind="host", gpu="") > 10e6
    assert val(m, "muxtune_engine_gpus") == 0
    assert set(m.status()["tasks"]) == {t.key for t in tasks}
    body, ctype = m.render()
    assert ctype.startswith("text/plain") and b"muxtune_task_tokens_total" in body
    assert b"_created" not in body


def test_removed_task_loses_its_series(trainer_factory, make_task, data_dir, tmp_path):
    trainer = trainer_factory(tmp_path / "out")
    m = EngineMetrics()
    m.attach(trainer)
    trainer.telemetry = m
    a = trainer.add_task(make_task("a", data_dir / "reverse.jsonl", steps=50))
    trainer.add_task(make_task("b", data_dir / "upper.jsonl", steps=50))
    for _ in range(2):
        trainer.run_round()
    assert val(m, "muxtune_task_fused", namespace="default", task="a") == 1
    assert val(m, "muxtune_engine_tasks_fused") == 2
    trainer.remove_task(a.key)
    assert task_series(m, a.key) == []
    assert task_series(m, "default/b")
    assert val(m, "muxtune_engine_tasks_resident") == 1


def test_non_finite_failure_sets_loss_nan_and_failed_phase():
    m = EngineMetrics()
    rt = fake_runtime()
    m.task_phase(rt)
    rt.phase, rt.message = "Failed", "loss became non-finite at step 3"
    m.task_phase(rt)
    assert math.isnan(val(m, "muxtune_task_loss", namespace="team-a", task="t"))
    assert val(m, "muxtune_task_phase", namespace="team-a", task="t", phase="Failed") == 1
    other = fake_runtime("u")
    m.task_phase(other)
    other.phase, other.message = "Failed", "dataset not found"
    m.task_phase(other)
    assert val(m, "muxtune_task_loss", namespace="team-a", task="u") is None  # not a NaN story


def test_progress_timestamp_starts_with_running_and_moves_with_steps():
    from muxtune.engine.observe.telemetry import StepRecord

    now = [1000.0]
    m = EngineMetrics(clock=lambda: now[0])
    rt = fake_runtime(phase="Pending")
    m.task_phase(rt)
    assert val(m, "muxtune_task_last_progress_timestamp_seconds", namespace="team-a", task="t") is None
    rt.phase = "Running"
    m.task_phase(rt)
    assert val(m, "muxtune_task_last_progress_timestamp_seconds", namespace="team-a", task="t") == 1000
    now[0] = 1060.0
    m.step_done(rt, StepRecord(step=1, loss=2.0, tokens=100, label_tokens=50, lr=1e-3, grad_norm=1.0,
                               seconds=60, tokens_per_second=100 / 60))
    assert val(m, "muxtune_task_last_progress_timestamp_seconds", namespace="team-a", task="t") == 1060
    now[0] = 2000.0
    m.task_phase(rt)  # still Running: a repeated report is no progress
    assert val(m, "muxtune_task_last_progress_timestamp_seconds", namespace="team-a", task="t") == 1060


def test_checkpoint_outcomes():
    m = EngineMetrics()
    rt = fake_runtime()
    m.checkpoint_done(rt, 0.3, True)
    m.checkpoint_done(rt, 5.0, False)
    assert val(m, "muxtune_engine_checkpoint_duration_seconds_count") == 1
    assert val(m, "muxtune_engine_checkpoint_duration_seconds_sum") == pytest.approx(0.3)
    assert val(m, "muxtune_engine_checkpoint_failures_total") == 1


def test_gpu_series_from_the_probe():
    gpus = [GpuSample(0, "GPU-aaaa", 10 << 30, 12 << 30, 0.75), GpuSample(1, "GPU-bbbb", 9 << 30, 9 << 30, None)]
    m = EngineMetrics(probe=FakeProbe(gpus))
    assert val(m, "muxtune_engine_gpus") == 2
    assert val(m, "muxtune_engine_memory_bytes", kind="gpu", gpu="0") == 10 << 30
    assert val(m, "muxtune_engine_memory_peak_bytes", kind="gpu", gpu="1") == 9 << 30
    assert val(m, "muxtune_engine_gpu_utilization_ratio", gpu="0", uuid="GPU-aaaa") == 0.75
    assert val(m, "muxtune_engine_gpu_utilization_ratio", gpu="1", uuid="GPU-bbbb") is None  # no NVML reading
    assert val(m, "muxtune_engine_memory_bytes", kind="host", gpu="") > 0


def test_probe_degrades_without_gpu_or_nvml():
    probe = ProcessProbe()
    assert probe.gpus() == []  # CPU run: CUDA is never initialised by the scrape
    rss, peak = probe.host_memory()
    assert 0 < rss <= peak
    # no libnvidia-ml here; where there is one, an unknown UUID finds no device: None either way
    assert probe.nvml.utilization("GPU-00000000-0000-0000-0000-000000000000") is None
    assert probe.nvml.utilization("") is None
