"""Prometheus metrics and the /v1/status document of one engine process.

Every series is either per task (labels ``namespace``, ``task``: the tasks resident in this
process, a bounded set that shrinks when a task leaves) or per engine process (no labels beyond a
few bounded ones: ``phase``, ``kind``, ``gpu``). Which pod, group and namespace the process runs
in is added by the scrape as target labels (``pod``, ``group``, ``namespace``; see
dashboards/README.md); the per-task ``namespace`` label is the task's namespace, which is why
the PodMonitor scrapes with ``honorLabels: true``.

| metric | type | meaning |
| --- | --- | --- |
| muxtune_task_tokens_total | counter | real (non-padding) tokens of the task's completed optimizer steps |
| muxtune_task_steps_total | counter | optimizer steps this process completed for the task |
| muxtune_task_step | gauge | the task's current optimizer step, counting steps restored from a checkpoint |
| muxtune_task_max_steps | gauge | the task's optimizer steps in all (spec.training.maxSteps, or derived from epochs) |
| muxtune_task_eval_loss | gauge | mean token loss on the task's validation data, at its latest evaluation |
| muxtune_task_loss | gauge | mean token loss of the latest step (NaN after a non-finite loss failed the task) |
| muxtune_task_learning_rate | gauge | learning rate the latest step used |
| muxtune_task_grad_norm | gauge | global L2 norm of the latest step's gradient, before clipping |
| muxtune_task_tokens_per_second | gauge | the latest step's tokens / wall time since the task's previous step |
| muxtune_task_phase{phase} | gauge | 1 for the task's phase, 0 for the other four |
| muxtune_task_fused | gauge | 1 if the task's sequences were in the latest fused forward/backward |
| muxtune_task_fused_rounds_total | counter | fused forward/backwards that carried the task's sequences |
| muxtune_task_waiting_rounds_total | counter | fused forward/backwards that left the runnable task out (token budget) |
| muxtune_task_examples_dropped_total | counter | examples of the task's dataset not trained on: no completion token within maxSeqLen |
| muxtune_task_last_progress_timestamp_seconds | gauge | unix time of the task's latest step, or of its start if it has none yet |
| muxtune_engine_info{backbone,device,version} | gauge | always 1; what this engine runs |
| muxtune_engine_step_duration_seconds | histogram | wall time of one fused forward/backward over the backbone |
| muxtune_engine_effective_token_ratio | gauge | real tokens / computed tokens of the latest fused forward (0-1) |
| muxtune_engine_attention_work_ratio | gauge | attention (query, key) pairs needed / computed of the latest fused forward (0-1) |
| muxtune_engine_real_tokens_total | counter | real tokens through the backbone (all tasks) |
| muxtune_engine_computed_tokens_total | counter | tokens computed including padding (rate ratio = effective ratio) |
| muxtune_engine_tasks_resident | gauge | tasks whose adapters are attached (phase Running) |
| muxtune_engine_tasks_fused | gauge | resident tasks in the latest fused forward |
| muxtune_engine_tasks_waiting | gauge | resident tasks the latest fused forward left out |
| muxtune_engine_memory_bytes{kind,gpu} | gauge | memory in use: host RSS (kind=host), PyTorch reserved per GPU (kind=gpu) |
| muxtune_engine_memory_peak_bytes{kind,gpu} | gauge | peak of the above since the process started |
| muxtune_engine_gpus | gauge | CUDA devices the process uses (0 on CPU) |
| muxtune_engine_gpu_utilization_ratio{gpu,uuid} | gauge | NVML: share of the last sample period a kernel ran on the device (0-1) |
| muxtune_engine_checkpoint_duration_seconds | histogram | wall time of one successful checkpoint write |
| muxtune_engine_checkpoint_failures_total | counter | checkpoint writes that failed |
| muxtune_engine_parallel_degree{dim} | gauge | ranks of the engine group along dim (dp, tp, pp); the group reports from rank 0 |
| muxtune_engine_stage_busy_seconds_total{stage} | counter | seconds the pipeline stage computed forwards/backwards (mean over dp replicas) |
| muxtune_engine_stage_idle_seconds_total{stage} | counter | seconds the stage waited within rounds (pipeline bubble) |
| muxtune_engine_pipeline_bubble_ratio{stage} | gauge | the stage's idle / wall time over the run so far (0-1) |

Memory and GPU utilisation are read at scrape time; NVML is reached through ``libnvidia-ml.so.1``
with ctypes (no Python dependency) and is simply absent where the library or a GPU is.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from muxtune.engine.observe.telemetry import RoundRecord, StepRecord, Telemetry

log = logging.getLogger("muxtune.engine")

# engine.task's phases (kept here so this module does not import torch; a test checks they match)
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
RUNNING, FAILED = "Running", "Failed"

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CHECKPOINT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


# ----- what the process uses, read at scrape time -------------------------------------------
@dataclass
class GpuSample:
    index: int  # CUDA ordinal in this process
    uuid: str | None  # "GPU-…", as NVML and the DCGM exporter spell it
    memory_bytes: int  # reserved by PyTorch's caching allocator
    peak_bytes: int
    utilization: float | None  # 0-1, None where NVML is not available


class _Nvml:
    """The two NVML calls we need, through ctypes; unavailable (never raising) without the library."""

    class _Utilization(ctypes.Structure):
        _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]

    def __init__(self):
        self.lib = None
        self.tried = False

    def _init(self) -> bool:
        if not self.tried:
            self.tried = True
            try:
                lib = ctypes.CDLL("libnvidia-ml.so.1")
                if lib.nvmlInit_v2() == 0:
                    self.lib = lib
                else:
                    log.debug("NVML did not initialise: no GPU utilisation metrics")
            except OSError:
                log.debug("libnvidia-ml.so.1 not found: no GPU utilisation metrics")
        return self.lib is not None

    def utilization(self, uuid: str) -> float | None:
        if not uuid or not self._init():
            return None
        handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) != 0:
            return None
        u = self._Utilization()
        if self.lib.nvmlDeviceGetUtilizationRates(handle, ctypes.byref(u)) != 0:
            return None
        return u.gpu / 100.0


class ProcessProbe:
    """Host RSS and its peak; per CUDA device: PyTorch's reserved memory, its peak, NVML utilisation.

    CUDA is never initialised here (the scrape thread must not create a context on a CPU run):
    GPUs are reported only once the engine itself has put the backbone on one.
    """

    def __init__(self):
        self.nvml = _Nvml()
        try:
            import psutil

            self._proc = psutil.Process()
        except Exception:  # noqa: BLE001 - psutil is optional
            self._proc = None

    def host_memory(self) -> tuple[int, int]:
        rss = 0
        if self._proc is not None:
            rss = self._proc.memory_info().rss
        else:
            try:
                rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                pass
        try:
            import resource

            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux reports KiB
        except (ImportError, OSError):
            peak = rss
        return rss, max(peak, rss)

    def gpus(self) -> list[GpuSample]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            try:
                uuid = str(torch.cuda.get_device_properties(i).uuid)
                uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            except Exception:  # noqa: BLE001 - older torch, odd driver
                uuid = None
            out.append(GpuSample(
                index=i, uuid=uuid,
                memory_bytes=int(torch.cuda.memory_reserved(i)),
                peak_bytes=int(torch.cuda.max_memory_reserved(i)),
                utilization=self.nvml.utilization(uuid) if uuid else None,
            ))
        return out


# ----- per-task state the hooks keep ----------------------------------------------------------
@dataclass
class _TaskSeries:
    namespace: str
    task: str
    phase: str = "Pending"
    step: int = 0
    max_steps: int = 0
    tokens: int = 0
    steps: int = 0
    fused_rounds: int = 0
    waiting_rounds: int = 0
    fused: bool = False
    waiting: bool = False
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    last_progress: float | None = None
    examples_dropped: int = 0
    eval_loss: float | None = None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("muxtune")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "unknown"


class EngineMetrics(Telemetry):
    """Telemetry sink that keeps the engine's Prometheus series; attach() the trainers it serves."""

    def __init__(self, registry: CollectorRegistry | None = None, *, probe: ProcessProbe | None = None,
                 clock=time.time):
        disable_created_metrics()  # no *_created series: noise for every counter and histogram
        self.registry = registry or CollectorRegistry()
        self.trainers = []
        self.status_extras = []  # callables -> {task key: extra /v1/status fields}
        self.probe = probe or ProcessProbe()
        self.clock = clock
        self._lock = threading.Lock()
        self._tasks: dict[str, _TaskSeries] = {}
        self._info: dict[str, str] | None = None
        self._effective: float | None = None
        self._attention_work: float | None = None
        self._real_tokens = 0
        self._computed_tokens = 0
        self._checkpoint_failures = 0
        self._host_peak = 0
        self._stages: dict[int, list[float]] = {}  # stage -> [busy, wall] seconds so far
        self._dims = None  # the engine group's ParallelDims, from the attached trainer
        r = self.registry
        self.step_seconds = Histogram(
            "muxtune_engine_step_duration_seconds", "Wall time of one fused forward/backward over the backbone.",
            registry=r, buckets=STEP_BUCKETS,
        )
        self.checkpoint_seconds = Histogram(
            "muxtune_engine_checkpoint_duration_seconds", "Wall time of one successful checkpoint write.",
            registry=r, buckets=CHECKPOINT_BUCKETS,
        )
        r.register(_Collector(self))

    # ----- wiring ---------------------------------------------------------------------------
    def attach(self, trainer) -> None:
        self.trainers.append(trainer)
        group = getattr(trainer, "group", None)
        if group is not None:
            self._dims = group.dims
        backbone = getattr(trainer, "backbone", None)
        if backbone is not None:
            with self._lock:
                self._info = {
                    "backbone": Path(str(backbone.path)).name,
                    "device": str(backbone.device.type),
                    "version": _version(),
                }

    def _series(self, rt) -> _TaskSeries:
        key = rt.key
        s = self._tasks.get(key)
        if s is None:
            s = self._tasks[key] = _TaskSeries(namespace=rt.task.metadata.namespace or "default", task=rt.name)
        return s

    # ----- Telemetry hooks (the trainer's thread) ---------------------------------------------
    def task_phase(self, task) -> None:
        with self._lock:
            s = self._series(task)
            entering_running = task.phase == RUNNING and s.phase != RUNNING
            s.phase = task.phase
            s.step = task.step
            s.max_steps = task.max_steps
            s.examples_dropped = getattr(task, "examples_dropped", 0)
            if getattr(task, "eval_loss", None) is not None and s.eval_loss is None:
                s.eval_loss = task.eval_loss  # resumed: the latest evaluation it saved
            if task.last_loss is not None and s.loss is None:
                s.loss = task.last_loss  # resumed or already trained: the loss it ended at
            if entering_running:
                s.last_progress = self.clock()
            if task.phase != RUNNING:
                s.fused = s.waiting = False
            if task.phase == FAILED and "non-finite" in (task.message or ""):
                s.loss = math.nan

    def step_done(self, task, record: StepRecord) -> None:
        with self._lock:
            s = self._series(task)
            s.tokens += record.tokens
            s.steps += 1
            s.step = record.step
            s.loss = record.loss
            s.lr = record.lr
            s.grad_norm = record.grad_norm
            s.tokens_per_second = record.tokens_per_second
            if record.eval_loss is not None:
                s.eval_loss = record.eval_loss
            s.last_progress = self.clock()

    def round_done(self, record: RoundRecord) -> None:
        self.step_seconds.observe(record.seconds)
        fused, waiting = set(record.fused), set(record.waiting)
        with self._lock:
            self._effective = record.effective_token_ratio
            if record.attention_work_ratio is not None:  # a round that reports none keeps the last figure
                self._attention_work = record.attention_work_ratio
            self._real_tokens += record.real_tokens
            self._computed_tokens += record.computed_tokens
            for st in record.stages:
                acc = self._stages.setdefault(st.stage, [0.0, 0.0])
                acc[0] += st.busy_seconds
                acc[1] += max(st.wall_seconds, st.busy_seconds)
            for key, s in self._tasks.items():
                s.fused_rounds += key in fused
                s.waiting_rounds += key in waiting
                # the gauges describe resident tasks: one that finished in this round reads 0
                s.fused = key in fused and s.phase == RUNNING
                s.waiting = key in waiting and s.phase == RUNNING

    def checkpoint_done(self, task, seconds: float, ok: bool) -> None:
        if ok:
            self.checkpoint_seconds.observe(seconds)
        else:
            with self._lock:
                self._checkpoint_failures += 1

    # ----- readers (the HTTP thread) ----------------------------------------------------------
    def _drop_departed(self) -> None:
        """Tasks that left every attached trainer lose their series (bounded label sets)."""
        if not self.trainers:
            return
        live = {k for tr in self.trainers for k in list(tr.tasks)}
        for key in [k for k in self._tasks if k not in live]:
            del self._tasks[key]

    def snapshot(self) -> _Snapshot:
        """The state the scrape renders, copied under the lock (departed tasks dropped first)."""
        with self._lock:
            self._drop_departed()
            return _Snapshot(
                tasks=[_TaskSeries(**vars(s)) for s in self._tasks.values()], info=self._info,
                effective=self._effective, attention_work=self._attention_work, real=self._real_tokens,
                computed=self._computed_tokens, failures=self._checkpoint_failures,
                stages={s: tuple(v) for s, v in self._stages.items()}, dims=self._dims)

    def stage_seconds(self) -> dict[int, tuple[float, float]]:
        """stage -> (busy, idle) seconds so far."""
        with self._lock:
            return {s: (busy, wall - busy) for s, (busy, wall) in sorted(self._stages.items())}

    def status(self) -> dict:
        """Each task's status (paths relative to the run output: no absolute path leaves the pod), and
        the engine group's layout with each pipeline stage's busy and idle seconds (rank 0 reports)."""
        tasks = {}
        for tr in self.trainers:
            roots = [Path(r).resolve() for r in (getattr(tr, "output", None), getattr(tr, "base_dir", None)) if r]
            for k, t in list(tr.tasks.items()):
                st = t.status()
                for field in ("checkpoint", "message"):
                    if isinstance(st.get(field), str):
                        st[field] = _relative(st[field], roots)
                tasks[k] = st
        for extra in self.status_extras:  # e.g. serving: {task key: {"servedModel": name}}
            for key, fields in extra().items():
                if key in tasks:
                    tasks[key].update(fields)
        out = {"tasks": tasks}
        dims = self._dims
        if dims is not None:
            out["parallel"] = {
                "dp": dims.dp, "tp": dims.tp, "pp": dims.pp, "world": dims.world_size,
                "stages": [{"stage": s, "busySeconds": round(busy, 6), "idleSeconds": round(idle, 6),
                            "bubbleFraction": idle / (busy + idle) if busy + idle > 0 else 0.0}
                           for s, (busy, idle) in self.stage_seconds().items()],
            }
        return out

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _relative(text: str, roots: list[Path]) -> str:
    """Absolute paths under the output (or data) root, written relative to it."""
    for root in roots:
        if str(root) != "/":  # the root itself reads ".", a path under it loses the prefix
            text = re.sub(re.escape(str(root)) + r"(/|(?![\w.-]))", lambda m: "" if m.group(1) else ".", text)
    return text


@dataclass
class _Snapshot:
    """EngineMetrics' state at one scrape, copied under its lock."""

    tasks: list[_TaskSeries]
    info: dict[str, str] | None
    effective: float | None
    attention_work: float | None
    real: int
    computed: int
    failures: int
    stages: dict[int, tuple[float, float]]
    dims: object


class _Collector:
    """Builds the per-task and sampled series at scrape time from EngineMetrics' state."""

    def __init__(self, m: EngineMetrics):
        self.m = m

    def collect(self):
        snap = self.m.snapshot()
        yield from _task_families(snap.tasks)
        yield from _engine_families(snap)
        yield from _stage_families(snap.stages)
        yield from _process_families(self.m.probe)


def _task_families(tasks: list[_TaskSeries]):
    labels = ["namespace", "task"]

    def fam(kind, name, doc, extra=()):
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        return cls(name, doc, labels=[*labels, *extra])

    tokens = fam("counter", "muxtune_task_tokens", "Real (non-padding) tokens of the task's completed optimizer steps.")
    steps = fam("counter", "muxtune_task_steps", "Optimizer steps this process completed for the task.")
    step = fam("gauge", "muxtune_task_step", "Current optimizer step, counting steps restored from a checkpoint.")
    max_steps = fam("gauge", "muxtune_task_max_steps", "The task's optimizer steps in all (maxSteps, or from epochs).")
    eval_loss = fam("gauge", "muxtune_task_eval_loss", "Mean token loss on the task's validation data, latest evaluation.")
    loss = fam("gauge", "muxtune_task_loss", "Mean token loss of the latest step (NaN: a non-finite loss failed the task).")
    lr = fam("gauge", "muxtune_task_learning_rate", "Learning rate the latest step used.")
    grad = fam("gauge", "muxtune_task_grad_norm", "Global L2 gradient norm of the latest step, before clipping.")
    tps = fam("gauge", "muxtune_task_tokens_per_second", "The latest step's tokens / wall time since the task's previous step.")
    phase = fam("gauge", "muxtune_task_phase", "1 for the task's current phase, 0 for the others.", ["phase"])
    fused = fam("gauge", "muxtune_task_fused", "1 if the task's sequences were in the latest fused forward/backward.")
    fused_rounds = fam("counter", "muxtune_task_fused_rounds", "Fused forward/backwards that carried the task's sequences.")
    waiting_rounds = fam("counter", "muxtune_task_waiting_rounds",
                         "Fused forward/backwards that left the runnable task out (token budget).")
    dropped = fam("counter", "muxtune_task_examples_dropped",
                  "Examples of the task's dataset not trained on: no completion token within maxSeqLen.")
    progress = fam("gauge", "muxtune_task_last_progress_timestamp_seconds",
                   "Unix time of the task's latest optimizer step, or of its start while it has none.")
    for s in tasks:
        lv = [s.namespace, s.task]
        tokens.add_metric(lv, s.tokens)
        steps.add_metric(lv, s.steps)
        step.add_metric(lv, s.step)
        max_steps.add_metric(lv, s.max_steps)
        for p in PHASES:
            phase.add_metric([*lv, p], 1.0 if s.phase == p else 0.0)
        fused.add_metric(lv, 1.0 if s.fused else 0.0)
        fused_rounds.add_metric(lv, s.fused_rounds)
        waiting_rounds.add_metric(lv, s.waiting_rounds)
        dropped.add_metric(lv, s.examples_dropped)
        for f, v in ((loss, s.loss), (eval_loss, s.eval_loss), (lr, s.lr), (grad, s.grad_norm), (tps, s.tokens_per_second),
                     (progress, s.last_progress)):
            if v is not None:
                f.add_metric(lv, v)
    return (tokens, steps, step, max_steps, loss, eval_loss, lr, grad, tps, phase, fused, fused_rounds,
            waiting_rounds, dropped, progress)


def _engine_families(snap: _Snapshot):
    if snap.info is not None:
        g = GaugeMetricFamily("muxtune_engine_info", "Always 1: the backbone, device and version this engine runs.",
                              labels=list(snap.info))
        g.add_metric(list(snap.info.values()), 1.0)
        yield g
    if snap.effective is not None:
        yield GaugeMetricFamily("muxtune_engine_effective_token_ratio",
                                "Real tokens / computed tokens of the latest fused forward (0-1).", value=snap.effective)
    if snap.attention_work is not None:
        yield GaugeMetricFamily("muxtune_engine_attention_work_ratio",
                                "Attention (query, key) pairs needed / computed of the latest fused forward (0-1).",
                                value=snap.attention_work)
    yield CounterMetricFamily("muxtune_engine_real_tokens", "Real tokens through the backbone, all tasks.", value=snap.real)
    yield CounterMetricFamily("muxtune_engine_computed_tokens",
                              "Tokens computed through the backbone, padding included.", value=snap.computed)
    running = [s for s in snap.tasks if s.phase == RUNNING]
    for name, n, doc in (
        ("resident", len(running), "Tasks whose adapters are attached (phase Running)."),
        ("fused", sum(s.fused for s in running), "Resident tasks in the latest fused forward/backward."),
        ("waiting", sum(s.waiting for s in running), "Resident tasks the latest fused forward/backward left out."),
    ):
        yield GaugeMetricFamily(f"muxtune_engine_tasks_{name}", doc, value=n)
    yield CounterMetricFamily("muxtune_engine_checkpoint_failures", "Checkpoint writes that failed.", value=snap.failures)
    if snap.dims is not None:
        degree = GaugeMetricFamily("muxtune_engine_parallel_degree",
                                   "Ranks of the engine group along dim (dp, tp, pp).", labels=["dim"])
        for dim in ("dp", "tp", "pp"):
            degree.add_metric([dim], getattr(snap.dims, dim))
        yield degree


def _stage_families(stages: dict[int, tuple[float, float]]):
    if not stages:
        return
    busy = CounterMetricFamily("muxtune_engine_stage_busy_seconds",
                               "Seconds the pipeline stage computed forwards and backwards (mean over dp replicas).",
                               labels=["stage"])
    idle = CounterMetricFamily("muxtune_engine_stage_idle_seconds",
                               "Seconds the pipeline stage waited within rounds (the pipeline bubble).",
                               labels=["stage"])
    bubble = GaugeMetricFamily("muxtune_engine_pipeline_bubble_ratio",
                               "The stage's idle time over its wall time so far (0-1).", labels=["stage"])
    for s, (b, wall) in sorted(stages.items()):
        busy.add_metric([str(s)], b)
        idle.add_metric([str(s)], wall - b)
        bubble.add_metric([str(s)], (wall - b) / wall if wall > 0 else 0.0)
    yield busy
    yield idle
    yield bubble


def _process_families(probe: ProcessProbe):
    """Memory and GPU utilisation, read now."""
    mem = GaugeMetricFamily("muxtune_engine_memory_bytes",
                            "Memory in use: host RSS (kind=host), PyTorch reserved per GPU (kind=gpu).",
                            labels=["kind", "gpu"])
    peak = GaugeMetricFamily("muxtune_engine_memory_peak_bytes", "Peak of muxtune_engine_memory_bytes since start.",
                             labels=["kind", "gpu"])
    rss, rss_peak = probe.host_memory()
    mem.add_metric(["host", ""], rss)
    peak.add_metric(["host", ""], rss_peak)
    gpus = probe.gpus()
    util = GaugeMetricFamily("muxtune_engine_gpu_utilization_ratio",
                             "NVML: share of the last sample period a kernel ran on the device (0-1).",
                             labels=["gpu", "uuid"])
    for g in gpus:
        mem.add_metric(["gpu", str(g.index)], g.memory_bytes)
        peak.add_metric(["gpu", str(g.index)], g.peak_bytes)
        if g.utilization is not None:
            util.add_metric([str(g.index), g.uuid or ""], g.utilization)
    yield mem
    yield peak
    yield GaugeMetricFamily("muxtune_engine_gpus", "CUDA devices this process uses (0 on CPU).", value=len(gpus))
    if util.samples:
        yield util
