"""`muxtune run`: load tasks, share one backbone per baseModel, train, report."""
from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from muxtune.api.finetunetask import FineTuneTask
from muxtune.api.loader import SpecError, load_task_files
from muxtune.api.strictyaml import MAX_FILE_BYTES as MAX_TASK_FILE_BYTES
from muxtune import logs
from muxtune.engine import preflight
from muxtune.engine.data.datafile import DataLimits
from muxtune.engine.model.backbone import MultiplexedBackbone
from muxtune.engine.model.loading import ModelLoadError, resolve_base_model
from muxtune.engine.parallel import ranks
from muxtune.engine.parallel.dims import LayoutError
from muxtune.engine.parallel.group import LocalGroup
from muxtune.engine.observe.progress import ProgressBar, summary_table
from muxtune.engine.task import FAILED, SUCCEEDED, TaskRuntime
from muxtune.engine.observe.telemetry import Fanout
from muxtune.engine.observe.trackers import Trackers
from muxtune.engine.memory_share import MemoryShare
from muxtune.engine.runtime import StopFlag, install_kernels, load_multiplexed, pick_device, pick_dtype
from muxtune.engine.trainer import MuxTrainer
from muxtune.facts import trust
from muxtune.runconfig import RunConfig

log = logging.getLogger("muxtune.engine")


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
            step = trainer.tasks[key].step
            trainer.remove_task(key, reason="removed from the group")
            log.info("task left", extra={"task": key, "step": step, "reason": "removed from the task files"})
            continue
        rt, new = trainer.tasks[key], by_key[key]
        if rt.task.spec == new.spec:
            continue
        if rt.task.spec.model_copy(update={"priority": new.spec.priority, "serving": new.spec.serving}) == new.spec:
            rt.task = new  # priority and serving change how the task is shared or served, not what it trains
            log.info("task updated in place", extra={"task": key, "priority": new.spec.priority})
        else:
            trainer.remove_task(key, reason="spec changed")
            log.info("task left", extra={"task": key, "step": rt.step, "reason": "spec changed; re-added"})
    for key, task in by_key.items():
        if key not in trainer.tasks:
            rt = trainer.add_task(task)
            log.info("task joined", extra={"task": key, "phase": rt.phase, "step": rt.step,
                                           **({"reason": rt.message} if rt.message else {})})


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


def run_group(tasks: list[FineTuneTask], cfg: RunConfig, stop, base_dir: Path, metrics=None,
              group=None, device: torch.device | None = None, serve_sock=None) -> MuxTrainer:
    """Train the tasks of one baseModel over one backbone until they finish (or, with --watch,
    until stopped); stop() asks to finish the round in flight and checkpoint."""
    group = group or LocalGroup()
    device = device or pick_device(cfg.device)
    base_model = tasks[0].spec.base_model
    backbone = _open_backbone(base_model, group, device, pick_dtype(cfg.dtype, device), cfg.trust_remote_code,
                              cfg.quantize)
    trainer = _new_trainer(backbone, cfg, base_dir, group, metrics, tasks, device)
    serving = None
    if serve_sock is not None and group.world == 1:  # co-serving: engine/serve/
        from muxtune.engine.serve.stack import Serving

        serving = Serving.coserving(backbone, base_model, trainer, cfg, serve_sock, metrics)
    elif cfg.serving and group.world > 1:  # rank 0 fronts the API, every rank follows it (engine/serve/distributed.py)
        from muxtune.engine.serve.distributed import serve_in_group
        from muxtune.engine.serve.follower import Follower
        from muxtune.engine.serve.stack import Serving, limits_from

        serving = serve_in_group(
            group, lambda ch: Serving.coserving(backbone, base_model, trainer, cfg, serve_sock, metrics, channel=ch),
            lambda ch: Follower(backbone, group, limits_from(cfg), ch, trainer))
    clean = False
    try:
        _drive(trainer, cfg, stop, group, serving, base_model)
        clean = True
    except Exception as exc:  # noqa: BLE001 - outside a round (serving, watching): no task stays Running
        from muxtune.engine.trainer import describe_exception

        trainer.fail_running(group.record_error(f"internal error: {describe_exception(exc)}"))
        if group.world > 1:
            raise
    finally:
        if clean or group.world == 1:  # interrupted: leave checkpoints the rerun replays exactly
            trainer.save_cut()  # (a collective, so in a group only when every rank got here)
        trainer.telemetry.close()
        if serving is not None:
            serving.close()
    return trainer


def _open_backbone(base_model: str, group, device: torch.device, dtype: torch.dtype,
                   trust_remote_code: bool = False, quantization: str = "none") -> MultiplexedBackbone:
    """This rank's part of the backbone; a backbone that cannot be loaded raises ModelLoadError on
    every rank of the group alike (its tasks fail, the run goes on)."""
    error = None
    try:
        path = resolve_base_model(base_model, Path.cwd())
        backbone = load_multiplexed(path, device, dtype, group, announce=lambda msg: print(msg, file=sys.stderr),
                                    trust_remote_code=trust_remote_code, quantization=quantization)
    except Exception as exc:  # noqa: BLE001 - whatever breaks the backbone fails its tasks, not the run
        error = f"baseModel {base_model}: {exc}"
    if (error := group.first_error(error)) is not None:
        raise ModelLoadError(error)
    install_kernels(backbone, device)
    return backbone


def _new_trainer(backbone, cfg: RunConfig, base_dir: Path, group, metrics, tasks,
                 device: torch.device | None = None) -> MuxTrainer:
    backbone.recompute = cfg.recompute
    trainer = MuxTrainer(
        backbone, cfg.output, token_budget=cfg.token_budget, chunk_size=cfg.chunk_size,
        resume=cfg.resume, base_dir=base_dir, allow_data_change=cfg.allow_data_change,
        data_limits=DataLimits(cfg.max_dataset_bytes, cfg.max_line_bytes, fetch=cfg.remote), group=group,
        micro_batches=cfg.micro_batches, interleave=cfg.interleave,
        print_schedule=print if cfg.print_schedule else None, remote=cfg.remote,
    )
    if cfg.gpu_memory_fraction is not None:  # a GPU shared with another group's engine
        if group.world > 1:  # ranks would lower their budgets apart; the planner shares 1-GPU groups only
            raise SystemExit("--gpu-memory-fraction: a shared GPU runs a one-process group (dp = tp = pp = 1)")
        trainer.memory_share = MemoryShare(cfg.gpu_memory_fraction, device or pick_device(cfg.device),
                                           cfg.device_memory_mib)
    sinks = [Trackers()] if group.is_writer else []
    if metrics is not None:
        metrics.attach(trainer)
        sinks.append(metrics)
    trainer.telemetry = Fanout(*sinks)
    for task in tasks:
        trainer.add_task(task)
    if cfg.progress and group.is_writer:  # created after the tasks are known, so its total is right
        trainer.telemetry = Fanout(*sinks, ProgressBar(trainer))
    return trainer


def _drive(trainer: MuxTrainer, cfg: RunConfig, stop, group, serving, base_model: str) -> None:
    """Train until done; with --watch follow the task files until stopped; while serving, keep
    serving after training until stopped."""
    if cfg.watch:
        step = serving.loop.iteration if serving else trainer.run_round
        idle = serving.loop.wait if serving else stop.event.wait if isinstance(stop, StopFlag) else time.sleep
        watcher = TaskFileWatcher(cfg.tasks) if group.is_writer else None
        while True:  # rank 0 reads the signal and the files; every rank applies the same
            stopping, wanted = group.decide(lambda: (stop(), watcher.changed()))
            if stopping:
                break
            if wanted is not None:
                reconcile(trainer, [t for t in wanted if t.spec.base_model == base_model])
            if not step():
                idle(1.0)
    elif serving is not None:  # train while serving, then keep serving until stopped
        serving.loop.run(stop, until_trained=True)
        if not group.decide(stop):  # rank 0's loop decided for the group
            print("training finished; the adapters are still served (Ctrl-C to stop)", file=sys.stderr, flush=True)
            serving.loop.run(stop)
    else:
        trainer.run(stop)


def run_from_cli(cfg: RunConfig) -> int:
    """`muxtune run` in this process: check, then start this node's ranks (each runs this
    again, as a worker) or join the group and train. Module-level: the ranks' entrypoint."""
    logs.configure(cfg.log_level, extra={"torch.distributed": "error"})
    try:
        tasks = _load_tasks(cfg.tasks)
        base_dir = preflight.check_data_root(cfg.data_root)
        groups: dict[str, list[FineTuneTask]] = defaultdict(list)
        for t in tasks:
            groups[t.spec.base_model].append(t)
        preflight.check_backbones(cfg, list(groups))
        preflight.check_output(cfg.output)  # read-only checks, before any rank starts
        preflight.check_layout(cfg.output, tasks)
    except preflight.CliProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _prepare_models(tasks)
    if ranks.must_launch(cfg.dp, cfg.tp, cfg.pp):
        return ranks.launch(cfg.world, run_from_cli, cfg)
    try:
        group, device = ranks.join(cfg.dp, cfg.tp, cfg.pp, pick_device(cfg.device))
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _train(cfg, groups, base_dir, group, device)
    finally:
        group.close()


def _load_tasks(paths: list[Path]) -> list[FineTuneTask]:
    try:
        if trust.active():
            trust.active().check(paths)
        return load_task_files(paths)
    except trust.TrustError as exc:
        raise preflight.CliProblem(f"task files not trusted: {exc}") from None
    except SpecError as exc:
        raise preflight.CliProblem(f"invalid task spec\n{exc}") from None


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


@dataclass
class _Endpoints:
    """What rank 0 alone holds while the group trains: the metrics server, the serving port, the output lock."""

    metrics: object = None
    server: object = None
    serve_sock: object = None
    lock: object = None

    @classmethod
    def open(cls, cfg: RunConfig) -> _Endpoints:
        """Nothing is trained or written until these pass (the lock creates the output last)."""
        ends = cls()
        try:
            if cfg.metrics_port is not None:
                from muxtune.engine.observe.engine_metrics import EngineMetrics

                ends.metrics = EngineMetrics()
                status = trust.active().signed(ends.metrics.status) if trust.active() else ends.metrics.status
                ends.server = preflight.start_server(cfg.metrics_host, cfg.metrics_port, status, ends.metrics.render,
                                                    cfg.status_token_sha256)
            if cfg.serving:
                ends.serve_sock = preflight.listen("--serve-port", cfg.serve_host, cfg.serve_port)
            ends.lock = preflight.lock_output(cfg.output)
        except preflight.CliProblem:
            ends.close()
            raise
        return ends

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.serve_sock is not None:
            self.serve_sock.close()  # already closed by the serving stack, unless its backbone failed to load
        if self.lock is not None:
            self.lock.release()


def _train(cfg: RunConfig, groups: dict[str, list[FineTuneTask]], base_dir: Path, group, device: torch.device) -> int:
    """Train every backbone group; rank 0 alone holds the output lock, serves metrics and reports."""
    writer = group.is_writer
    ends, problem = _Endpoints(), None
    if writer:
        try:
            ends = _Endpoints.open(cfg)
        except preflight.CliProblem as exc:
            problem = str(exc)
    if (problem := group.decide(lambda: problem)) is not None:
        if writer:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if ends.server is not None:
        print(f"serving /metrics and /v1/status on {cfg.metrics_host}:{ends.server.port}", file=sys.stderr)
    stop = StopFlag(escalate=group.world == 1)
    t0 = time.perf_counter()
    runtimes, real, computed, rounds = [], 0, 0, 0
    try:
        for members in groups.values():
            if group.decide(stop):
                break
            try:
                trainer = run_group(members, cfg, stop, base_dir, ends.metrics, group, device, ends.serve_sock)
            except ModelLoadError as exc:
                runtimes += failed_group(members, str(exc), cfg.output, writer)
                continue
            runtimes += trainer.tasks.values()
            real, computed, rounds = real + trainer.real_tokens, computed + trainer.computed_tokens, rounds + trainer.rounds
    finally:
        ends.close()
    if writer:  # one rank speaks for the group
        print(summary_table(runtimes))
        if computed:
            print(f"{rounds} fused forward/backward passes, effective-token ratio {real / computed:.3f}")
        print(f"wall time {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    signum = group.decide(lambda: stop.signum)  # the group exits as rank 0 does
    code = _exit_code(runtimes, signum, serving_after_training=cfg.serving and all(r.done for r in runtimes))
    return ranks.exit_if_signalled(group, code, signum is not None)


def _exit_code(runtimes: list[TaskRuntime], signum: int | None, serving_after_training: bool) -> int:
    if signum is not None and not serving_after_training:
        return 128 + signum
    if any(r.phase == FAILED for r in runtimes):
        return 1
    return 0 if all(r.phase == SUCCEEDED for r in runtimes) else 1
