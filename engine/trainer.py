"""The co-scheduling loop: each round fuses the chosen tasks' sequences into one packed
forward/backward over the shared backbone, then steps every task whose batch is complete.

Transparency: the backpropagated loss is Σ_task (task token-loss sum / task step label tokens);
a task's gradient depends only on its own tokens (block-diagonal attention, per-task deltas), so
it trains as it would alone. A failing task (bad data, NaN) leaves; the others go on.

In a torch.distributed group every rank runs this same loop over the same tasks and data, so the
scheduler and packing decide the same everywhere; `group` (engine/parallel/group.py) agrees on
what could differ, splits each round over the data-parallel replicas and pipeline stages
(engine/parallel/plan.py, pipeline.py), and only rank 0 writes outputs.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from muxtune.api.finetunetask import FineTuneTask
from muxtune.engine import checkpoint as ckpt
from muxtune.engine import scheduler, steps
from muxtune.engine.backbone import MultiplexedBackbone
from muxtune.engine.data import DataStream, load_examples
from muxtune.engine.packing import PackedSequence, pack
from muxtune.engine.parallel import state as dstate
from muxtune.engine.parallel.group import LocalGroup
from muxtune.engine.parallel.pipeline import RoundExecutor
from muxtune.engine.parallel.plan import plan_round, replica_share
from muxtune.engine.parallel.schedule import render, simulate, stage_actions
from muxtune.engine.task import FAILED, PENDING, RUNNING, SUCCEEDED, SUSPENDED, TaskRuntime
from muxtune.engine.telemetry import RoundRecord, StageRecord, StepRecord, Telemetry

log = logging.getLogger("muxtune.engine")


class MuxTrainer:
    def __init__(
        self,
        backbone: MultiplexedBackbone,
        output: Path,
        *,
        token_budget: int = 4096,
        chunk_size: int | None = None,
        resume: bool = True,
        telemetry: Telemetry | None = None,
        base_dir: Path | None = None,
        group=None,
        micro_batches: int | None = None,
        interleave: bool = True,
        print_schedule=None,
    ):
        self.backbone = backbone
        self.group = group or LocalGroup()
        self.micro_batches = micro_batches or self.group.dims.pp  # per task and round, under pp
        self.interleave = interleave
        self.print_schedule = print_schedule  # callable(text) on rank 0, or None
        self.executor = RoundExecutor(backbone, self.group)
        self.output = Path(output)
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.resume = resume
        self.telemetry = telemetry or Telemetry()
        self.base_dir = base_dir
        self.tasks: dict[str, TaskRuntime] = {}
        self._next_slot = 0
        self.rounds = 0
        self.real_tokens = 0  # over the whole run, for the effective-token ratio
        self.computed_tokens = 0
        self._solo_rounds = 0
        self.step_hooks: list = []  # callables(trainer, runtime) after each optimizer step

    # ----- membership -------------------------------------------------------------------
    def task_dir(self, task: FineTuneTask) -> Path:
        """<output>/<namespace>/<output.path or name>: tenants' outputs never share a directory."""
        return self.output / (task.metadata.namespace or "default") / (task.spec.output.path or task.metadata.name)

    def add_task(self, task: FineTuneTask) -> TaskRuntime:
        """Attach a task; any problem fails this task alone, with the reason."""
        if task.key in self.tasks and not self.tasks[task.key].done:
            raise ValueError(f"task {task.key} is already running")
        rt = TaskRuntime(task=task, slot=self._next_slot, out_dir=self.task_dir(task))
        self._next_slot += 1
        self.tasks[task.key] = rt
        if task.spec.suspend:
            return self._set_phase(rt, SUSPENDED, "spec.suspend is true")
        error = None
        try:
            if self._already_succeeded(rt):
                return rt
            examples = load_examples(task.spec.dataset, self.backbone.tokenizer, self.base_dir)
            rt.stream = DataStream(examples, task.spec.training.seed, task.spec.dataset.shuffle)
            rt.adapter = self.backbone.attach(rt.slot, task.spec.peft, task.spec.training.seed)
            rt.build_optimizer()
        except Exception as exc:  # noqa: BLE001 - any setup error is this task's failure
            error = str(exc)
        if (error := self.group.first_error(error)) is None:  # one rank's bad read fails it everywhere
            try:
                self._maybe_resume(rt)
            except Exception as exc:  # noqa: BLE001
                error = str(exc)
            error = self.group.first_error(error)
        if error is not None:
            self.backbone.detach(rt.slot)
            return self._fail(rt, error)
        if rt.step >= rt.max_steps:
            self._finish(rt)
        else:
            self._set_phase(rt, RUNNING, None)
        return rt

    def remove_task(self, key: str, phase: str = SUSPENDED, reason: str = "removed from the run") -> None:
        """Checkpoint and detach, so re-adding resumes where it left off."""
        rt = self.tasks.get(key)
        if rt is None:
            return
        if rt.phase == RUNNING:
            self._checkpoint(rt)
            self.backbone.detach(rt.slot)
            self._set_phase(rt, phase, reason)
        del self.tasks[key]

    def _already_succeeded(self, rt: TaskRuntime) -> bool:
        def read():  # rank 0 reads the output for the group
            status = rt.out_dir / "status.json"
            if not (self.resume and status.exists()):
                return None
            data = json.loads(status.read_text())
            if data.get("phase") == SUCCEEDED and data.get("specHash") == ckpt.spec_hash(rt.task.spec):
                return int(data["step"]), data.get("loss")
            return None

        done = self.group.decide(read)
        if done is None:
            return False
        rt.step, rt.last_loss = done
        self._set_phase(rt, SUCCEEDED, "already trained (output found)")
        return True

    def _maybe_resume(self, rt: TaskRuntime) -> None:
        """Collective: rank 0 reads the latest checkpoint (full state) and every rank keeps its part."""
        names = dstate.full_names(rt, self.group)

        def read():
            path = ckpt.latest(rt.out_dir) if self.resume else None
            metrics = rt.out_dir / "metrics.jsonl"
            if path is None:
                if metrics.exists():
                    metrics.unlink()
                return None
            payload = dstate.read_checkpoint(rt, path, names)
            # drop metric lines past the checkpoint: those steps will be trained again
            lines = [ln for ln in metrics.read_text().splitlines()
                     if ln and json.loads(ln)["step"] <= payload["step"]] if metrics.exists() else []
            metrics.write_text("".join(ln + "\n" for ln in lines))
            return str(path), payload

        found = self.group.decide(read)
        if found is None:
            return
        path, payload = found
        dstate.apply_checkpoint(rt, payload)
        rt.checkpoint = path
        log.info("resumed", extra={"task": rt.key, "step": rt.step, "checkpoint": path})

    # ----- the loop ---------------------------------------------------------------------
    def active(self) -> list[TaskRuntime]:
        return [t for t in self.tasks.values() if t.phase == RUNNING]

    def run_round(self, token_budget: int | None = None) -> bool:
        """One fused forward/backward (one pipeline round under pp). False when no task has work."""
        active = self.active()
        if not active:
            return False
        for rt in active:
            if not rt.pending:
                rt.begin_step()
        g = self.group
        budget = (token_budget or self.token_budget) * g.dims.dp  # the budget bounds each replica
        if self._solo_rounds:
            self._solo_rounds, budget = self._solo_rounds - 1, 1
        picks, waiting = scheduler.select(active, budget)
        plan = self._plan(picks, g.dp_rank)
        if self.print_schedule is not None and g.is_writer:
            self.print_schedule(self._schedule_text(plan))
        n_slots = max(p.task.slot for p in picks) + 1
        norm = torch.zeros(n_slots)
        for p in picks:
            norm[p.task.slot] = 1.0 / p.task.step_label_tokens
        slots = [p.task.slot for p in picks]
        if g.dims.pp == 1:
            outcome = self.executor.run_fused(plan, norm, n_slots, lambda o: not o.non_finite(slots))
            if not outcome.backward_done:
                self._isolate_non_finite(picks)
                return True
        else:  # one task per micro-batch: a non-finite loss is that task's alone
            outcome = self.executor.run_pipeline(plan, norm, n_slots)
            for p in picks:
                if p.task.slot in outcome.non_finite(slots):
                    self._fail(p.task, f"loss became non-finite at step {p.task.step + 1}")
            picks = [p for p in picks if p.task.phase == RUNNING]
        keys = [p.task.key for p in picks]
        completing = []
        for p in picks:
            rt = p.task
            del rt.pending[: len(p.examples)]
            rt.step_loss_sum += float(outcome.slot_loss[rt.slot])
            rt.served_tokens += sum(len(ex.input_ids) for ex in p.examples)
            rt.step_fused_with.update(k for k in keys if k != rt.key)
            rt.step_real += outcome.real_tokens
            rt.step_computed += outcome.computed_tokens
            if not rt.pending:
                completing.append(rt)
        steps.step_all(self, completing)
        self.rounds += 1
        self.real_tokens += outcome.real_tokens
        self.computed_tokens += outcome.computed_tokens
        stages = [StageRecord(s, busy, wall) for s, (busy, wall) in enumerate(zip(outcome.stage_busy, outcome.stage_wall))]
        self.telemetry.round_done(RoundRecord(keys, [t.key for t in waiting], outcome.real_tokens,
                                              outcome.computed_tokens, max(outcome.stage_wall), stages))
        return True

    def _plan(self, picks, dp_rank: int):
        bb, g = self.backbone, self.group
        return plan_round(picks, dp=g.dims.dp, dp_rank=dp_rank, pp=g.dims.pp, micro_batches=self.micro_batches,
                          interleave=self.interleave, chunk_size=self.chunk_size, device=bb.device,
                          pad_id=bb.tokenizer.pad_token_id or 0, attn_ratio=bb.attn_ratio)

    def _schedule_text(self, plan) -> str:
        timeline = simulate(stage_actions(plan.flushes, self.group.dims.pp))
        mode = "interleaved" if self.interleave else "one flush per task"
        title = (f"round {self.rounds + 1}: {len(plan.microbatches)} micro-batches on data-parallel replica 0, "
                 f"{self.group.dims.pp} stage(s), {mode}")
        return render(timeline, plan.labels(), title)

    def run(self, should_stop=lambda: False) -> None:
        while not self.group.decide(should_stop) and self.run_round():
            pass

    def _record_step(self, rt: TaskRuntime, lr: float, grad_norm: float) -> None:
        """A task's optimizer step happened: account, log, maybe finish or checkpoint."""
        rt.step += 1
        rt.tokens_total += rt.step_tokens
        now = time.monotonic()
        seconds, rt.last_step_time = now - rt.last_step_time, now
        rt.last_loss = rt.step_loss_sum / rt.step_label_tokens
        rt.tokens_per_second = rt.step_tokens / seconds if seconds > 0 else None
        record = StepRecord(
            step=rt.step, loss=rt.last_loss, tokens=rt.step_tokens, label_tokens=rt.step_label_tokens,
            lr=lr, grad_norm=grad_norm, seconds=seconds, tokens_per_second=rt.tokens_per_second or 0.0,
            fused_with=sorted(rt.step_fused_with),
            effective_token_ratio=rt.step_real / max(1, rt.step_computed),
        )
        if self.group.is_writer:
            rt.out_dir.mkdir(parents=True, exist_ok=True)
            with open(rt.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record.as_dict()) + "\n")
        self.telemetry.step_done(rt, record)
        interval = rt.task.spec.training.checkpoint_interval
        if rt.step >= rt.max_steps:
            self._finish(rt)
        elif interval and rt.step % interval == 0:
            self._checkpoint(rt)
        for hook in self.step_hooks:
            hook(self, rt)

    def _isolate_non_finite(self, picks) -> None:
        """A non-finite loss can spill into neighbours sharing a chunk (0 * inf in attention).
        Re-run each task's sequences alone: the ones still non-finite fail, the rest retry."""
        share = {task.key: exs for task, exs in replica_share(picks, self.group.dims.dp, self.group.dp_rank)}
        batches = []
        for p in picks:
            exs = share.get(p.task.key)
            batch = pack([PackedSequence(p.task.slot, ex) for ex in exs], None, self.backbone.device,
                         attn_ratio=self.backbone.attn_ratio) if exs else None
            batches.append((p.task.slot, batch))
        losses = self.executor.isolate(batches, max(p.task.slot for p in picks) + 1)
        failed = False
        for p, loss in zip(picks, losses.tolist()):
            if not math.isfinite(loss):
                self._fail(p.task, f"loss became non-finite at step {p.task.step + 1}")
                failed = True
        if not failed:
            self._solo_rounds = len(picks)  # never fused-only NaN: run them one by one, no loop

    # ----- outcomes ---------------------------------------------------------------------
    def _checkpoint(self, rt: TaskRuntime) -> None:
        """Collective: every stage's part gathered on rank 0, which writes the whole checkpoint."""
        t0 = time.perf_counter()
        try:
            path = dstate.save_checkpoint(rt, self.group, self.backbone.path)
            rt.checkpoint = str(path) if path is not None else rt.checkpoint
            ok = True
        except OSError as exc:
            log.error("checkpoint failed", extra={"task": rt.key, "error": str(exc)})
            ok = False
        self.telemetry.checkpoint_done(rt, time.perf_counter() - t0, ok)

    def _finish(self, rt: TaskRuntime) -> None:
        dstate.save_final_adapter(rt, self.group, self.backbone.path)
        self._checkpoint(rt)
        self.backbone.detach(rt.slot)
        self._set_phase(rt, SUCCEEDED, f"trained {rt.step} steps")

    def _fail(self, rt: TaskRuntime, reason: str) -> TaskRuntime:
        if rt.optimizer is not None:
            rt.optimizer.zero_grad(set_to_none=True)
        if rt.adapter is not None:
            self.backbone.detach(rt.slot)
        rt.pending = []
        log.error("task failed", extra={"task": rt.key, "reason": reason})
        return self._set_phase(rt, FAILED, reason)

    def _set_phase(self, rt: TaskRuntime, phase: str, message: str | None) -> TaskRuntime:
        rt.phase, rt.message = phase, message
        if phase != PENDING and self.group.is_writer:
            try:
                rt.write_status()
            except OSError as exc:
                log.error("cannot write status", extra={"task": rt.key, "error": str(exc)})
        self.telemetry.task_phase(rt)
        return rt
