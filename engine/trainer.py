"""The co-scheduling loop: each round fuses the chosen tasks' sequences into one packed
forward/backward over the shared backbone, then steps every task whose batch is complete.

Transparency: the backpropagated loss is Σ_task (task token-loss sum / task step label tokens);
a task's gradient depends only on its own tokens (block-diagonal attention, per-task deltas), so
it trains as it would alone. A failing task (bad data, NaN, a file the disk refuses) leaves;
the others go on.

Checkpoints are taken at round boundaries, all running tasks together (a cut), so a restarted run
replays the interrupted one exactly (recovery.py); how one task is saved is checkpoint.py's.

In a torch.distributed group every rank runs this same loop over the same tasks and data, so the
scheduler and packing decide the same everywhere; `group` (engine/parallel/group.py) agrees on
what could differ, splits each round over the data-parallel replicas and pipeline stages
(engine/parallel/plan.py; one stage runs in engine/executor.py, a pipeline stage in
engine/parallel/pipeline.py), and only rank 0 writes outputs; checkpoints hold the
whole state (engine/parallel/state.py), so a run resumes under any layout.
"""
from __future__ import annotations

import json
import logging
import math
import time
import traceback
import uuid
from pathlib import Path

import torch

from muxtune.api.finetunetask import FineTuneTask
from muxtune.engine.durable import checkpoint as ckpt
from muxtune.engine import evaluation, executor, steps
from muxtune.engine.durable import outputs
from muxtune.engine.durable import recovery
from muxtune.engine import fair_queue as scheduler
from muxtune.engine.durable import storage
from muxtune.engine.model.backbone import MultiplexedBackbone
from muxtune.engine.data.dataset import load_dataset
from muxtune.storage import export
from muxtune.storage.errors import StorageError
from muxtune.engine.data.datafile import DataLimits
from muxtune.engine.packing import PackedSequence, pack
from muxtune.engine.parallel import state as dstate
from muxtune.engine.parallel.group import LocalGroup
from muxtune.engine.parallel import pipeline
from muxtune.engine.parallel.plan import plan_round, replica_share
from muxtune.engine.parallel.schedule import render, simulate, stage_actions
from muxtune.engine.executor import RoundOutcome
from muxtune.engine.task import FAILED, PENDING, RUNNING, SUCCEEDED, SUSPENDED, TaskRuntime
from muxtune.engine.observe.telemetry import RoundRecord, StageRecord, StepRecord, Telemetry
from muxtune.runconfig import DEFAULT_TOKEN_BUDGET

log = logging.getLogger("muxtune.engine")


class MuxTrainer:
    def __init__(
        self,
        backbone: MultiplexedBackbone,
        output: Path,
        *,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        chunk_size: int | None = None,
        resume: bool = True,
        telemetry: Telemetry | None = None,
        base_dir: Path | None = None,
        allow_data_change: bool = False,
        data_limits: DataLimits | None = None,
        group=None,
        micro_batches: int | None = None,
        interleave: bool = True,
        print_schedule=None,
        remote: bool = True,
    ):
        self.backbone = backbone
        self.group = group or LocalGroup()
        self.micro_batches = micro_batches or self.group.dims.pp  # per task and round, under pp
        self.interleave = interleave
        self.print_schedule = print_schedule  # callable(text) on rank 0, or None
        self.output = Path(output)
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.resume = resume
        self.telemetry = telemetry or Telemetry()
        self.base_dir = base_dir
        self.allow_data_change = allow_data_change  # resume a checkpoint whose data fingerprint differs
        self.data_limits = data_limits or DataLimits()
        self.remote = remote  # upload to output.uri here (muxtune run), not in pods (an export Job does)
        self.tasks: dict[str, TaskRuntime] = {}
        self.rounds = 0
        self.real_tokens = 0  # over the whole run, for the effective-token ratio
        self.computed_tokens = 0
        self._solo_rounds = 0
        self.step_hooks: list = []  # callables(trainer, runtime) after each optimizer step
        self._aligned = False  # restarted tasks moved to their common cut (before the first round)
        self._in_round = False  # True while a round is half done: no checkpoint may see that state
        self.memory_share = None  # a MemoryShare (engine/memory_share.py) when the GPU is shared with another group
        self._cut_due = False
        self._ticks = 0  # rounds run, whatever their outcome
        self._last_cut: tuple | None = None
        self._finishing: list[TaskRuntime] = []  # reached maxSteps this round; finish after its cut

    # ----- membership -------------------------------------------------------------------
    def task_dir(self, task: FineTuneTask) -> Path:
        """<output>/<namespace>/<output.path or name>, confined to the output: tenants' outputs never share a directory."""
        return outputs.task_dir(self.output, task)

    def add_task(self, task: FineTuneTask) -> TaskRuntime:
        """Attach a task; any problem fails this task alone, with the reason."""
        if task.key in self.tasks and not self.tasks[task.key].done:
            raise ValueError(f"task {task.key} is already running")
        try:  # a directory outside the output, or another task's: fail without writing there
            out_dir = self.task_dir(task)
            problems = outputs.overlaps(task.key, out_dir, {k: t.out_dir for k, t in self.tasks.items()}, self.output)
        except outputs.OutputLayoutError as exc:
            out_dir, problems = None, [str(exc)]
        problems += dstate.unsupported(task, self.group.dims)
        rt = TaskRuntime(task=task, slot=self.backbone.new_slot(reuse=False), out_dir=None if problems else out_dir,
                         base_quantization=self.backbone.quantization)
        self.tasks[task.key] = rt
        if problems:
            return self._fail(rt, "; ".join(problems))
        if task.spec.suspend:
            return self._set_phase(rt, SUSPENDED, "spec.suspend is true")
        error = None
        try:  # collectives first (rank 0 looks at the files for all), then what each rank reads
            dstate.on_writer(self.group, lambda: recovery.claim_output(rt))
            if self._already_succeeded(rt):
                return rt
            data = load_dataset(task.spec.dataset, self.backbone.tokenizer, self.base_dir, self.data_limits,
                                seed=task.spec.training.seed)
            rt.use_data(data, ckpt.data_fingerprint(data.examples))
            rt.adapter = self.backbone.attach(rt.slot, task.spec.peft, task.spec.training.seed)
            rt.build_optimizer()
        except Exception as exc:  # noqa: BLE001 - any setup error is this task's failure
            error = str(exc) or type(exc).__name__  # MemoryError has no text
        if error is None and self.memory_share is not None:  # the GPU's share holds its state, or it is refused
            error = self.memory_share.refusal(self.backbone, [*self.active(), rt])
        if (error := self.group.first_error(error)) is None:  # one rank's bad read fails it everywhere
            try:
                if self.resume:
                    dstate.resume_task(rt, self.group, self.allow_data_change)
                else:
                    dstate.on_writer(self.group, lambda: recovery.start_over(rt))
            except Exception as exc:  # noqa: BLE001
                error = str(exc) or type(exc).__name__
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
        if rt.phase == RUNNING and not self._in_round:
            self._checkpoint(rt)
        if rt.phase == RUNNING:
            self.backbone.detach(rt.slot)
            self._set_phase(rt, phase, reason)
        del self.tasks[key]

    def _already_succeeded(self, rt: TaskRuntime) -> bool:
        def read():  # rank 0 reads the output for the group
            data = recovery.read_status(rt) if self.resume else None
            if data and data.get("phase") == SUCCEEDED and data.get("specHash") == ckpt.spec_hash(rt.task.spec):
                return (int(data["step"]), data.get("loss"), int(data.get("examplesDropped") or 0),
                        data.get("totalSteps"), data.get("evalLoss"))
            return None

        done = self.group.decide(read)
        if done is None:
            return False
        rt.step, rt.last_loss, rt.examples_dropped, rt.steps_total, rt.eval_loss = done
        self._set_phase(rt, SUCCEEDED, "already trained (output found)")
        return True

    def scheduler_state(self) -> dict:
        """What, besides the tasks' own state, decides the next rounds (saved with every cut)."""
        return {"rounds": self.rounds, "solo_rounds": self._solo_rounds,
                "real_tokens": self.real_tokens, "computed_tokens": self.computed_tokens}

    def load_scheduler_state(self, state: dict) -> None:
        self.rounds, self._solo_rounds = int(state["rounds"]), int(state["solo_rounds"])
        self.real_tokens, self.computed_tokens = int(state["real_tokens"]), int(state["computed_tokens"])

    def _align_once(self) -> None:
        """Before the first round (or exit checkpoint): restarted tasks move to their newest
        common cut, so the run replays the interrupted one (recovery.align; collective)."""
        if not self._aligned:
            self._aligned = True
            dstate.align(self)

    # ----- the loop ---------------------------------------------------------------------
    def active(self) -> list[TaskRuntime]:
        return [t for t in self.tasks.values() if t.phase == RUNNING]

    def run_round(self, token_budget: int | None = None) -> bool:
        """One fused forward/backward (one pipeline round under pp). False when no task has work.
        token_budget (capped by the trainer's own) bounds this round: co-serving passes what the
        latency SLOs leave. An unexpected exception inside the round fails the tasks of this
        backbone with its reason (status Failed) instead of ending the process with them Running."""
        try:
            return self._round(token_budget)
        except Exception as exc:  # noqa: BLE001 - whatever breaks a round breaks it for every task in it
            self._round_failed(exc)
            return False

    def _round_failed(self, exc: Exception) -> None:
        self._in_round = False
        self.fail_running(self.group.record_error(f"internal error in a training round: {describe_exception(exc)}"))
        if self.group.world > 1:  # the group cannot agree past one rank's exception: end it (the launcher reports)
            raise exc

    def fail_running(self, reason: str) -> None:
        """Every running task fails with reason (status.json says so). In a group, without a
        collective: the other ranks may be anywhere when one rank hits an exception."""
        for rt in self.active():
            if self.group.world == 1:
                self._fail(rt, reason)
                continue
            rt.pending, rt.phase, rt.message = [], FAILED, reason
            if self.group.is_writer:
                try:
                    rt.write_status()
                except Exception:  # noqa: BLE001 - nothing more to do for it
                    log.error("cannot write status", extra={"task": rt.key})

    def _round(self, token_budget: int | None) -> bool:
        self._align_once()
        active = self.active()
        if not active:
            return False
        self._in_round, self._ticks = True, self._ticks + 1
        picks, waiting = self._pick(active, token_budget)  # plan
        plan = self._plan(picks, self.group.dp_rank)
        outcome, picks = self._metered_forward_backward(picks, plan)  # forward/backward
        if outcome is None:  # a non-finite loss was isolated; the round is retried
            self._in_round = False
            return True
        completing = self._account(picks, outcome)
        for done in steps.step_all(self.group, completing):  # step
            if done.failed:
                self._fail(done.task, done.failed)
            else:
                self._record_step(done.task, done.lr, done.grad_norm)
        self._record_round([p.task.key for p in picks], [t.key for t in waiting], outcome)  # record
        self._in_round = False
        self._end_round()
        return True

    def _pick(self, active: list[TaskRuntime], token_budget: int | None):
        """The round's picks (task, examples) within the budget, and the runnable tasks left waiting."""
        for rt in active:
            if not rt.pending:
                rt.begin_step()
        budget = self.token_budget if token_budget is None else max(1, min(token_budget, self.token_budget))
        budget *= self.group.dims.dp  # the budget bounds each replica
        if self._solo_rounds:
            self._solo_rounds, budget = self._solo_rounds - 1, 1
        return scheduler.select(active, budget)

    def _metered_forward_backward(self, picks, plan) -> tuple[RoundOutcome | None, list]:
        """The round; on a shared GPU its resident + saved-tensor peak is checked against the share
        and the token budget lowered for the next rounds when it passed (engine/memory_share.py)."""
        share = self.memory_share
        if share is None:
            return self._forward_backward(picks, plan)
        with share.metered(self.backbone):
            result = self._forward_backward(picks, plan)
        least = max(rt.task.spec.dataset.max_seq_len for rt in self.active()) if self.active() else 1
        peak = share.resident(self.backbone, self.active()) + share.last_peak
        self.token_budget = share.budget_after(peak, self.token_budget, least)
        return result

    def _forward_backward(self, picks, plan) -> tuple[RoundOutcome | None, list]:
        """Run the plan; the outcome (None when a non-finite loss stopped the fused round before
        its backward) and the picks still running."""
        g = self.group
        if self.print_schedule is not None and g.is_writer:
            self.print_schedule(self._schedule_text(plan))
        n_slots = max(p.task.slot for p in picks) + 1
        norm = torch.zeros(n_slots)
        for p in picks:
            norm[p.task.slot] = 1.0 / p.task.step_label_tokens
        slots = [p.task.slot for p in picks]
        if g.dims.pp == 1:
            outcome = executor.run_fused(self.backbone, g, plan, norm, n_slots, lambda o: not o.non_finite(slots))
            if not outcome.backward_done:
                self._isolate_non_finite(picks)
                return None, picks
            return outcome, picks
        outcome = pipeline.run_pipeline(self.backbone, g, plan, norm, n_slots)
        for p in picks:  # one task per micro-batch: a non-finite loss is that task's alone
            if p.task.slot in outcome.non_finite(slots):
                self._fail(p.task, f"loss became non-finite at step {p.task.step + 1}")
        return outcome, [p for p in picks if p.task.phase == RUNNING]

    def _account(self, picks, outcome: RoundOutcome) -> list[TaskRuntime]:
        """Credit each pick's share of the round to its step; the tasks whose step batch is now complete."""
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
        return completing

    def _record_round(self, fused: list[str], waiting: list[str], outcome: RoundOutcome) -> None:
        self.rounds += 1
        self.real_tokens += outcome.real_tokens
        self.computed_tokens += outcome.computed_tokens
        stages = [StageRecord(s, busy, wall) for s, (busy, wall) in enumerate(zip(outcome.stage_busy, outcome.stage_wall))]
        self.telemetry.round_done(RoundRecord(fused, waiting, outcome.real_tokens,
                                              outcome.computed_tokens, max(outcome.stage_wall),
                                              outcome.attention_pairs_needed, outcome.attention_pairs_computed, stages))

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
        if evaluation.due(rt):  # no gradients: nothing of this round's training changes
            try:
                rt.eval_loss, rt.eval_step = evaluation.evaluate(self.backbone, rt, self.token_budget, self.group), rt.step
            except Exception as exc:  # noqa: BLE001 - the forward on held-out data: this task's failure
                return self._fail(rt, f"evaluation failed at step {rt.step}: {exc}")
        record = StepRecord(
            step=rt.step, loss=rt.last_loss, tokens=rt.step_tokens, label_tokens=rt.step_label_tokens,
            lr=lr, grad_norm=grad_norm, seconds=seconds, tokens_per_second=rt.tokens_per_second or 0.0,
            fused_with=sorted(rt.step_fused_with),
            effective_token_ratio=rt.step_real / max(1, rt.step_computed), batch=rt.step_digest,
            eval_loss=rt.eval_loss if rt.eval_step == rt.step else None,
        )
        error = None
        if self.group.is_writer:
            try:
                storage.append_line(rt.out_dir / "metrics.jsonl", json.dumps(record.as_dict()))
            except storage.StorageError as exc:
                error = str(exc)
        if self.group.world > 1:  # the writer's disk decides for every rank
            error = self.group.first_error(error)
        if error is not None:
            return self._fail(rt, error)
        self.telemetry.step_done(rt, record)
        interval = rt.task.spec.training.checkpoint_interval
        if rt.step >= rt.max_steps:
            self._finishing.append(rt)  # at the end of this round, after the cut (see _end_round)
        elif interval and rt.step - (rt.saved_step or 0) >= interval:
            self._cut_due = True  # at the end of this round, with every running task (which all
            # count their interval from then: a cut per interval, not one per task and interval)
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
        losses = executor.isolate(self.backbone, self.group, batches)
        failed = False
        for p, loss in zip(picks, losses.tolist()):
            if not math.isfinite(loss):
                self._fail(p.task, f"loss became non-finite at step {p.task.step + 1}")
                failed = True
        if not failed:
            self._solo_rounds = len(picks)  # never fused-only NaN: run them one by one, no loop

    # ----- outcomes ---------------------------------------------------------------------
    def _end_round(self) -> None:
        """Checkpoint first, then finish: a crash in between leaves a finished task unfinished on
        disk, so a restart replays it with its neighbours from their last common cut."""
        finishing, self._finishing = self._finishing, []
        done = {id(t) for t in finishing}
        if finishing and any(t.task.spec.training.checkpoint_interval for t in self.active() if id(t) not in done):
            self._cut_due = True  # a cut without them (not for tasks that only save at the end)
        if self._cut_due:
            self.save_cut(excluding=finishing)
        for rt in finishing:
            if rt.phase == RUNNING:
                self._finish(rt)

    def save_cut(self, excluding=()) -> None:
        """Checkpoint every running task at this round boundary, as one cut that a restarted
        run with the same members replays exactly (recovery.align). Not while a round is half
        done: after an exception mid-round the last complete cut stands. Collective."""
        if self._in_round:
            log.warning("a round was interrupted midway; keeping the last complete checkpoints")
            return
        self._align_once()
        skip = {id(t) for t in excluding}
        running = sorted((t for t in self.active() if id(t) not in skip), key=lambda r: r.slot)
        mark = (self._ticks, tuple(rt.key for rt in running))
        self._cut_due = False
        if not running or mark == self._last_cut:
            return
        cut = {"id": uuid.uuid4().hex[:12], "members": list(mark[1]), "trainer": self.scheduler_state()}
        for rt in running:
            self._checkpoint(rt, cut)
        self._last_cut = mark

    def _checkpoint(self, rt: TaskRuntime, cut: dict | None = None) -> None:
        """Save one task (collective: rank 0 writes the whole state); a save the disk keeps
        refusing fails this task alone, on every rank."""
        t0 = time.perf_counter()
        try:
            rt.checkpoint = str(dstate.save_checkpoint(rt, self.group, self.backbone.path, cut))
        except Exception as exc:  # noqa: BLE001 - torch and the OS raise many kinds; all are this task's
            self.telemetry.checkpoint_done(rt, time.perf_counter() - t0, False)
            self._fail(rt, f"checkpoint failed: {exc}")
            return
        self.telemetry.checkpoint_done(rt, time.perf_counter() - t0, True)

    def _finish(self, rt: TaskRuntime) -> None:
        try:
            dstate.save_final_adapter(rt, self.group, self.backbone.path, chat_template=rt.chat_template)
        except Exception as exc:  # noqa: BLE001
            self._fail(rt, f"cannot save the adapter: {exc}")
            return
        self._checkpoint(rt)
        if rt.phase != RUNNING:
            return
        if (error := self._export(rt)) is not None:
            self._fail(rt, error)
            return
        self.backbone.detach(rt.slot)
        self._set_phase(rt, SUCCEEDED, f"trained {rt.step} steps")

    def _export(self, rt: TaskRuntime) -> str | None:
        """output.uri: rank 0 uploads the finished directory; a refusal fails the task (its adapter stays)."""
        if not self.remote or rt.task.spec.output.uri is None:
            return None
        error = None
        if self.group.is_writer:
            self.telemetry.flush(rt)  # trackers' files are part of what is uploaded
            try:
                export.export_task(rt.task, rt.out_dir)
            except StorageError as exc:
                error = f"output.uri: {exc} (the adapter is kept in the output directory)"
        return self.group.first_error(error)

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
        error = None
        if phase != PENDING and self.group.is_writer:
            try:
                rt.write_status()
            except Exception as exc:  # noqa: BLE001 - a status that cannot be recorded fails the task
                log.error("cannot write status", extra={"task": rt.key, "error": str(exc)})
                error = str(exc)
        if phase != PENDING and self.group.world > 1:  # every rank calls this alike: agree
            error = self.group.first_error(error)
        if error is not None and phase != FAILED:
            return self._fail(rt, error)
        self.telemetry.task_phase(rt)
        return rt


def describe_exception(exc: BaseException) -> str:
    """`Type: message (at file:line)`, the innermost frame: one line a status can carry."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return f"{type(exc).__name__}: {exc}" + (f" (at {Path(where.filename).name}:{where.lineno})" if where else "")
