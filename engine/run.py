"""`muxtune run`: load tasks, share one backbone per baseModel, train, report."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

from muxtune.api.finetunetask import FineTuneTask
from muxtune.api.loader import SpecError, load_task_files
from muxtune.api.strictyaml import MAX_FILE_BYTES as MAX_TASK_FILE_BYTES
from muxtune import logs
from muxtune.engine import preflight
from muxtune.engine.backbone import MultiplexedBackbone
from muxtune.engine.datafile import DataLimits
from muxtune.engine.models import ModelLoadError, load_backbone, resolve_base_model
from muxtune.engine.progress import ProgressBar, summary_table
from muxtune.engine.task import FAILED, SUCCEEDED, TaskRuntime
from muxtune.engine.telemetry import Fanout
from muxtune.engine.trainer import MuxTrainer
from muxtune.engine import trust

log = logging.getLogger("muxtune.engine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class StopFlag:
    """SIGTERM/SIGINT finish the round in flight, checkpoint, and exit."""

    def __init__(self):
        self.signum: int | None = None
        self.event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()

    def __call__(self) -> bool:
        return self.event.is_set()


class TaskFileWatcher:
    """Re-reads the task files (a mounted ConfigMap in a pod) and reports what changed."""

    def __init__(self, paths: list[Path], interval: float = 1.0):
        self.paths = paths
        self.interval = interval  # a ConfigMap changes in seconds; don't read it every step
        self._next_check = time.monotonic() + interval
        self.digest = self._digest()

    def _digest(self) -> str:
        h = hashlib.sha256()
        guard = trust.active()
        for p in [*self.paths, *([trust.signature_path(x) for x in self.paths] if guard else [])]:
            try:
                with open(p, "rb") as f:  # bounded: the loader refuses anything larger anyway
                    h.update(f.read(MAX_TASK_FILE_BYTES + 1))
            except OSError:
                h.update(b"<missing>")
        return h.hexdigest()

    def changed(self) -> list[FineTuneTask] | None:
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + self.interval
        digest = self._digest()
        if digest == self.digest:
            return None
        try:
            if trust.active():
                trust.active().check(self.paths)  # signed by the operator for this group, not older
            tasks = load_task_files(self.paths)
        except trust.TrustError as exc:
            log.error("task files not applied: %s", exc, extra={"error": str(exc)})
            self.digest = digest
            return None
        except SpecError as exc:
            if "no FineTuneTask found" in str(exc):
                tasks = []
            else:
                log.error("task files invalid; keeping the current tasks", extra={"error": str(exc)})
                self.digest = digest
                return None
        self.digest = digest
        return tasks


def reconcile(trainer: MuxTrainer, wanted: list[FineTuneTask]) -> None:
    """Make the trainer's task set equal the file's: add, remove, and take out and re-add a task
    whose spec changed (re-adding refuses checkpoints written under the old spec).

    A new priority (its share of the backbone) or serving setting applies in place.
    """
    by_key = {t.key: t for t in wanted}
    for key in list(trainer.tasks):
        if key not in by_key:
            trainer.remove_task(key, reason="removed from the group")
            continue
        rt, new = trainer.tasks[key], by_key[key]
        if rt.task.spec == new.spec:
            continue
        if rt.task.spec.model_copy(update={"priority": new.spec.priority, "serving": new.spec.serving}) == new.spec:
            rt.task = new  # priority and serving change how the task is shared or served, not what it trains
        else:
            trainer.remove_task(key, reason="spec changed")
    for key, task in by_key.items():
        if key not in trainer.tasks:
            trainer.add_task(task)


def failed_group(tasks: list[FineTuneTask], reason: str, output: Path) -> list[TaskRuntime]:
    """The tasks of a backbone that cannot be loaded: each fails with the reason; others go on."""
    from muxtune.engine import outputs

    runtimes = []
    for task in tasks:
        rt = TaskRuntime(task=task, slot=-1, out_dir=outputs.task_dir(output, task), phase=FAILED, message=reason)
        log.error("task failed", extra={"task": rt.key, "reason": reason})
        try:
            rt.write_status()
        except OSError as exc:
            log.error("cannot write status", extra={"task": rt.key, "error": str(exc)})
        runtimes.append(rt)
    return runtimes


def run_group(tasks: list[FineTuneTask], cmd, stop: StopFlag, base_dir: Path, metrics=None, serve_sock=None) -> MuxTrainer:
    # read the files' state now: an edit made while the backbone loads is then seen as a change
    watcher = TaskFileWatcher(cmd.tasks) if cmd.watch else None
    device = pick_device(cmd.device)
    dtype = pick_dtype(cmd.dtype, device)
    try:
        path = resolve_base_model(tasks[0].spec.base_model, Path.cwd())
        backbone = MultiplexedBackbone(load_backbone(path, device, dtype))
    except Exception as exc:  # noqa: BLE001 - whatever breaks the backbone fails its tasks, not the run
        raise ModelLoadError(f"baseModel {tasks[0].spec.base_model}: {exc}") from None
    from muxtune.engine import lora_kernel

    lora_kernel.install(backbone.ctx, device)  # fused multi-task LoRA on CUDA; MUXTUNE_LORA_KERNEL=0 keeps the loop
    trainer = MuxTrainer(
        backbone, cmd.output, token_budget=cmd.token_budget, chunk_size=cmd.chunk_size,
        resume=cmd.resume, base_dir=base_dir, allow_data_change=cmd.allow_data_change,
        data_limits=DataLimits(cmd.max_dataset_bytes, cmd.max_line_bytes),
    )
    sinks = []
    if metrics is not None:
        metrics.attach(trainer)
        sinks.append(metrics)
    trainer.telemetry = Fanout(*sinks)
    for task in tasks:
        trainer.add_task(task)
    if cmd.progress:  # created after the tasks are known, so its total is right
        trainer.telemetry = Fanout(*sinks, ProgressBar(trainer))
    serving = None
    if serve_sock is not None:  # co-serving: engine/serve/
        from muxtune.engine.serve.launch import Serving

        serving = Serving.coserving(backbone, tasks[0].spec.base_model, trainer, cmd, serve_sock, metrics)
    step = serving.loop.iteration if serving else trainer.run_round
    idle = serving.loop.wait if serving else getattr(getattr(stop, "event", None), "wait", time.sleep)
    try:
        if watcher is not None:
            while not stop():
                wanted = watcher.changed()
                if wanted is not None:
                    reconcile(trainer, [t for t in wanted if t.spec.base_model == tasks[0].spec.base_model])
                if not step():
                    idle(1.0)
        elif serving is not None:  # train while serving, then keep serving until stopped
            serving.loop.run(stop, until_trained=True)
            if not stop():
                print("training finished; the adapters are still served (Ctrl-C to stop)", file=sys.stderr, flush=True)
                serving.loop.run(stop)
        else:
            trainer.run(stop)
    finally:
        trainer.save_cut()  # interrupted: leave checkpoints the rerun replays exactly
        trainer.telemetry.close()
        if serving is not None:
            serving.close()
    return trainer


def run_from_cli(cmd) -> int:
    logs.configure(cmd.log_level)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        print(f"error: WORLD_SIZE={world}: data parallelism across pods is not implemented by this engine; "
              "run the operator with max_dp 1 (the default)", file=sys.stderr)
        return 2
    try:
        if trust.active():
            trust.active().check(cmd.tasks)
        tasks = load_task_files(cmd.tasks)
    except trust.TrustError as exc:
        print(f"error: task files not trusted: {exc}", file=sys.stderr)
        return 2
    except SpecError as exc:
        print(f"error: invalid task spec\n{exc}", file=sys.stderr)
        return 2
    base_dir = Path(cmd.data_root).resolve()
    if not base_dir.is_dir():
        print(f"error: --data-root {cmd.data_root}: not a directory", file=sys.stderr)
        return 2
    groups: dict[str, list[FineTuneTask]] = defaultdict(list)
    for t in tasks:
        groups[t.spec.base_model].append(t)
    if cmd.watch and len(groups) > 1:
        print("error: --watch serves one backbone; the task files name " + ", ".join(groups), file=sys.stderr)
        return 2
    if getattr(cmd, "serve_port", None) is not None and len(groups) > 1:
        print("error: --serve-port serves one backbone; the task files name " + ", ".join(groups), file=sys.stderr)
        return 2
    metrics = server = lock = serve_sock = None
    try:  # nothing is trained or written until these pass (the lock creates the output last)
        preflight.check_output(cmd.output)
        preflight.check_layout(cmd.output, tasks)
        if cmd.metrics_port is not None:
            from muxtune.engine.metrics import EngineMetrics

            metrics = EngineMetrics()
            status = trust.active().signed(metrics.status) if trust.active() else metrics.status
            server = preflight.start_server(cmd.metrics_host, cmd.metrics_port, status, metrics.render)
        if getattr(cmd, "serve_port", None) is not None:
            serve_sock = preflight.listen("--serve-port", cmd.serve_host, cmd.serve_port)
        lock = preflight.lock_output(cmd.output)
    except preflight.CliProblem as exc:
        if server is not None:
            server.stop()
        if serve_sock is not None:
            serve_sock.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if server is not None:
        print(f"serving /metrics and /v1/status on {cmd.metrics_host}:{server.port}", file=sys.stderr)
    stop = StopFlag()
    t0 = time.perf_counter()
    runtimes, real, computed, rounds = [], 0, 0, 0
    try:
        for group in groups.values():
            if stop():
                break
            try:
                trainer = run_group(group, cmd, stop, base_dir, metrics, serve_sock)
            except ModelLoadError as exc:
                runtimes += failed_group(group, str(exc), cmd.output)
                continue
            runtimes += trainer.tasks.values()
            real, computed, rounds = real + trainer.real_tokens, computed + trainer.computed_tokens, rounds + trainer.rounds
    finally:
        if server is not None:
            server.stop()
        if serve_sock is not None:
            serve_sock.close()  # already closed by the serving stack, unless its backbone failed to load
        lock.release()
    print(summary_table(runtimes))
    if computed:
        print(f"{rounds} fused forward/backward passes, effective-token ratio {real / computed:.3f}")
    print(f"wall time {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    serving_after_training = getattr(cmd, "serve_port", None) is not None and all(r.done for r in runtimes)
    if stop.signum is not None and not serving_after_training:
        return 128 + stop.signum
    if any(r.phase == FAILED for r in runtimes):
        return 1
    return 0 if all(r.phase == SUCCEEDED for r in runtimes) else 1
