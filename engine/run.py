"""`muxtune run`: load tasks, share one backbone per baseModel, train, report."""
from __future__ import annotations

import hashlib
import logging
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
from muxtune.engine import parallel, preflight
from muxtune.engine.model.backbone import MultiplexedBackbone
from muxtune.engine.data.datafile import DataLimits
from muxtune.engine.model.loading import ModelLoadError, load_backbone, resolve_base_model
from muxtune.engine.parallel import ranks as launch
from muxtune.engine.parallel.dims import LayoutError
from muxtune.engine.parallel.group import LocalGroup
from muxtune.engine.observe.progress import ProgressBar, summary_table
from muxtune.engine.task import FAILED, SUCCEEDED, TaskRuntime
from muxtune.engine.observe.telemetry import Fanout
from muxtune.engine.observe.trackers import Trackers
from muxtune.engine.trainer import MuxTrainer
from muxtune.facts import trust

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
    """SIGTERM/SIGINT finish the round in flight, checkpoint, and exit.

    A second signal gives up at once; not in a rank of a group (escalate=False), whose launcher
    forwards the user's signal again and escalates to SIGKILL on its own after a grace period.
    """

    def __init__(self, escalate: bool = True):
        self.escalate = escalate
        self.signum: int | None = None
        self.event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        if self.signum is not None and self.escalate:  # second signal: give up at once
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


def failed_group(tasks: list[FineTuneTask], reason: str, output: Path, writer: bool = True) -> list[TaskRuntime]:
    """The tasks of a backbone that cannot be loaded: each fails with the reason; others go on."""
    from muxtune.engine.durable import outputs
    runtimes = []
    for task in tasks:
        rt = TaskRuntime(task=task, slot=-1, out_dir=outputs.task_dir(output, task), phase=FAILED, message=reason)
        if not writer:  # another rank of the group reports it
            runtimes.append(rt)
            continue
        log.error("task failed", extra={"task": rt.key, "reason": reason})
        try:
            rt.write_status()
        except OSError as exc:
            log.error("cannot write status", extra={"task": rt.key, "error": str(exc)})
        runtimes.append(rt)
    return runtimes


def run_group(tasks: list[FineTuneTask], cmd, stop: StopFlag, base_dir: Path, metrics=None,
              group=None, device: torch.device | None = None, serve_sock=None) -> MuxTrainer:
    group = group or LocalGroup()
    device = device or pick_device(cmd.device)
    dtype = pick_dtype(cmd.dtype, device)
    error = None
    try:
        path = resolve_base_model(tasks[0].spec.base_model, Path.cwd())
        staged = group.dims.pp > 1  # load on the host, keep only this rank's stage on the device
        backbone = MultiplexedBackbone(load_backbone(path, torch.device("cpu") if staged else device, dtype))
        parallel.setup_backbone(backbone, group, device, announce=lambda msg: print(msg, file=sys.stderr))
    except Exception as exc:  # noqa: BLE001 - whatever breaks the backbone fails its tasks, not the run
        error = f"baseModel {tasks[0].spec.base_model}: {exc}"
    if (error := group.first_error(error)) is not None:  # on every rank of the group alike
        raise ModelLoadError(error)
    from muxtune.engine.peft import lora_kernel
    lora_kernel.install(backbone.ctx, device)  # fused multi-task LoRA on CUDA; MUXTUNE_LORA_KERNEL=0 keeps the loop
    trainer = MuxTrainer(
        backbone, cmd.output, token_budget=cmd.token_budget, chunk_size=cmd.chunk_size,
        resume=cmd.resume, base_dir=base_dir, allow_data_change=cmd.allow_data_change,
        data_limits=DataLimits(cmd.max_dataset_bytes, cmd.max_line_bytes, fetch=cmd.remote), group=group,
        micro_batches=cmd.micro_batches, interleave=cmd.interleave,
        print_schedule=print if cmd.print_schedule else None, remote=cmd.remote,
    )
    sinks = [Trackers()] if group.is_writer else []
    if metrics is not None:
        metrics.attach(trainer)
        sinks.append(metrics)
    trainer.telemetry = Fanout(*sinks)
    for task in tasks:
        trainer.add_task(task)
    if cmd.progress and group.is_writer:  # created after the tasks are known, so its total is right
        trainer.telemetry = Fanout(*sinks, ProgressBar(trainer))
    serving = None
    if serve_sock is not None:  # co-serving (one process only): engine/serve/
        from muxtune.engine.serve.stack import Serving

        serving = Serving.coserving(backbone, tasks[0].spec.base_model, trainer, cmd, serve_sock, metrics)
    step = serving.loop.iteration if serving else trainer.run_round
    idle = serving.loop.wait if serving else getattr(getattr(stop, "event", None), "wait", time.sleep)
    clean = False
    try:
        if cmd.watch:
            watcher = TaskFileWatcher(cmd.tasks) if group.is_writer else None
            while True:  # rank 0 reads the signal and the files; every rank applies the same
                stopping, wanted = group.decide(lambda: (stop(), watcher.changed()))
                if stopping:
                    break
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
        clean = True
    finally:
        if clean or group.world == 1:  # interrupted: leave checkpoints the rerun replays exactly
            trainer.save_cut()  # (a collective, so in a group only when every rank got here)
        trainer.telemetry.close()
        if serving is not None:
            serving.close()
    return trainer


def run_from_cli(cmd) -> int:
    logs.configure(cmd.log_level, extra={"torch.distributed": "error"})
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
    serving = getattr(cmd, "serve_port", None) is not None
    if serving and len(groups) > 1:
        print("error: --serve-port serves one backbone; the task files name " + ", ".join(groups), file=sys.stderr)
        return 2
    if serving and cmd.dp * cmd.tp * cmd.pp > 1:
        print("error: --serve-port runs in one process; it cannot be combined with --dp/--tp/--pp above 1", file=sys.stderr)
        return 2
    try:  # read-only checks, before any rank starts
        preflight.check_output(cmd.output)
        preflight.check_layout(cmd.output, tasks)
    except preflight.CliProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _prepare_models(tasks)
    if launch.must_launch(cmd.dp, cmd.tp, cmd.pp):  # start this node's ranks; each runs run_from_cli
        return launch.launch(cmd, launch.rank_main)
    try:
        group, device = launch.join(cmd, pick_device(cmd.device))
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _train(cmd, groups, base_dir, group, device)
    finally:
        group.close()


def _prepare_models(tasks: list[FineTuneTask]) -> None:
    """Generate built-in models before any process group exists: transformers' save_pretrained
    writes no weights on a rank other than 0 once torch.distributed is initialised, so a rank 1
    that won the build lock would leave a model directory without weights. Errors surface later,
    per group, where they always did."""
    for base in {t.spec.base_model for t in tasks}:
        try:
            resolve_base_model(base, Path.cwd())
        except Exception:  # noqa: BLE001 - reported by run_group for the tasks that use it
            pass


def _train(cmd, groups: dict[str, list[FineTuneTask]], base_dir: Path, group, device: torch.device) -> int:
    """Train every backbone group; rank 0 alone holds the output lock, serves metrics and reports."""
    writer = group.is_writer
    metrics = server = lock = serve_sock = None
    problem = None
    if writer:
        try:  # nothing is trained or written until these pass (the lock creates the output last)
            if cmd.metrics_port is not None:
                from muxtune.engine.observe.engine_metrics import EngineMetrics

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
            problem = str(exc)
    if (problem := group.decide(lambda: problem)) is not None:
        if writer:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if server is not None:
        print(f"serving /metrics and /v1/status on {cmd.metrics_host}:{server.port}", file=sys.stderr)
    stop = StopFlag(escalate=group.world == 1)
    t0 = time.perf_counter()
    runtimes, real, computed, rounds = [], 0, 0, 0
    try:
        for members in groups.values():
            if group.decide(stop):
                break
            try:
                trainer = run_group(members, cmd, stop, base_dir, metrics, group, device, serve_sock)
            except ModelLoadError as exc:
                runtimes += failed_group(members, str(exc), cmd.output, writer)
                continue
            runtimes += trainer.tasks.values()
            real, computed, rounds = real + trainer.real_tokens, computed + trainer.computed_tokens, rounds + trainer.rounds
    finally:
        if server is not None:
            server.stop()
        if serve_sock is not None:
            serve_sock.close()  # already closed by the serving stack, unless its backbone failed to load
        if lock is not None:
            lock.release()
    if writer:  # one rank speaks for the group
        print(summary_table(runtimes))
        if computed:
            print(f"{rounds} fused forward/backward passes, effective-token ratio {real / computed:.3f}")
        print(f"wall time {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    signum = group.decide(lambda: stop.signum)  # the group exits as rank 0 does
    serving_after_training = serve_sock is not None and all(r.done for r in runtimes)
    if signum is not None and not serving_after_training:
        return 128 + signum
    if any(r.phase == FAILED for r in runtimes):
        return 1
    return 0 if all(r.phase == SUCCEEDED for r in runtimes) else 1
