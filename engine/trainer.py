"""The co-scheduling loop: each round fuses the chosen tasks' sequences into one packed
forward/backward over the shared backbone, then steps every task whose batch is complete.

Transparency: the backpropagated loss is Σ_task (task token-loss sum / task step label tokens);
a task's gradient depends only on its own tokens (block-diagonal attention, per-task deltas), so
it trains as it would alone. A failing task (bad data, NaN) leaves; the others go on.
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
from muxtune.engine import scheduler
from muxtune.engine.backbone import MultiplexedBackbone
from muxtune.engine.data import DataStream, load_examples
from muxtune.engine.packing import PackedSequence, pack, round_up
from muxtune.engine.peft.export import save_adapter
from muxtune.engine.task import FAILED, PENDING, RUNNING, SUCCEEDED, SUSPENDED, TaskRuntime
from muxtune.engine.telemetry import RoundRecord, StepRecord, Telemetry

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
    ):
        self.backbone = backbone
        self.output = Path(output)
        self.token_budget = token_budget
        self.chunk_size = chunk_size
        self.resume = resume
        self.telemetry = telemetry or Telemetry()
        self.base_dir = base_dir
        self.tasks: dict[str, TaskRuntime] = {}
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
        rt = TaskRuntime(task=task, slot=self.backbone.new_slot(), out_dir=self.task_dir(task))
        self.tasks[task.key] = rt
        if task.spec.suspend:
            return self._set_phase(rt, SUSPENDED, "spec.suspend is true")
        try:
            if self._already_succeeded(rt):
                return rt
            examples = load_examples(task.spec.dataset, self.backbone.tokenizer, self.base_dir)
            rt.stream = DataStream(examples, task.spec.training.seed, task.spec.dataset.shuffle)
            rt.adapter = self.backbone.attach(rt.slot, task.spec.peft, task.spec.training.seed)
            rt.build_optimizer()
            self._maybe_resume(rt)
        except Exception as exc:  # noqa: BLE001 - any setup error is this task's failure
            self.backbone.detach(rt.slot)
            return self._fail(rt, str(exc))
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
        status = rt.out_dir / "status.json"
        if not (self.resume and status.exists()):
            return False
        data = json.loads(status.read_text())
        if data.get("phase") == SUCCEEDED and data.get("specHash") == ckpt.spec_hash(rt.task.spec):
            rt.step, rt.last_loss = int(data["step"]), data.get("loss")
            self._set_phase(rt, SUCCEEDED, "already trained (output found)")
            return True
        return False

    def _maybe_resume(self, rt: TaskRuntime) -> None:
        path = ckpt.latest(rt.out_dir) if self.resume else None
        metrics = rt.out_dir / "metrics.jsonl"
        if path is None:
            if metrics.exists():
                metrics.unlink()
            return
        ckpt.restore(rt, path)
        rt.checkpoint = str(path)
        # drop metric lines past the checkpoint: those steps will be trained again
        lines = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= rt.step] if metrics.exists() else []
        metrics.write_text("".join(ln + "\n" for ln in lines))
        log.info("resumed", extra={"task": rt.key, "step": rt.step, "checkpoint": str(path)})

    # ----- the loop ---------------------------------------------------------------------
    def active(self) -> list[TaskRuntime]:
        return [t for t in self.tasks.values() if t.phase == RUNNING]

    def run_round(self, token_budget: int | None = None) -> bool:
        """One fused forward/backward. False when no task has work. token_budget (capped by the
        trainer's own) bounds this round: co-serving passes what the latency SLOs leave."""
        active = self.active()
        if not active:
            return False
        for rt in active:
            if not rt.pending:
                rt.begin_step()
        budget = self.token_budget if token_budget is None else max(1, min(token_budget, self.token_budget))
        if self._solo_rounds:
            self._solo_rounds, budget = self._solo_rounds - 1, 1
        picks, waiting = scheduler.select(active, budget)
        seqs = [PackedSequence(p.task.slot, ex) for p in picks for ex in p.examples]
        chunk = None
        if self.chunk_size:  # a fixed length, grown when a sequence would not fit
            chunk = max(self.chunk_size, round_up(max(len(s.example.input_ids) for s in seqs), 8))
        batch = pack(seqs, chunk, self.backbone.device, self.backbone.tokenizer.pad_token_id or 0,
                     attn_ratio=self.backbone.attn_ratio)
        t0 = time.perf_counter()
        result = self.backbone.forward_loss(batch)
        slot_loss = result.task_loss_sum.detach().cpu()
        bad = [p for p in picks if not math.isfinite(float(slot_loss[p.task.slot]))]
        if bad:
            self._isolate_non_finite(picks)
            return True
        norm = torch.zeros_like(result.task_loss_sum)
        for p in picks:
            norm[p.task.slot] = 1.0 / p.task.step_label_tokens
        (result.task_loss_sum * norm).sum().backward()
        seconds = time.perf_counter() - t0
        keys = [p.task.key for p in picks]
        for p in picks:
            rt = p.task
            del rt.pending[: len(p.examples)]
            rt.step_loss_sum += float(slot_loss[rt.slot])
            rt.served_tokens += sum(len(ex.input_ids) for ex in p.examples)
            rt.step_fused_with.update(k for k in keys if k != rt.key)
            rt.step_real += batch.real_tokens
            rt.step_computed += batch.computed_tokens
            if not rt.pending:
                self._optimizer_step(rt)
        self.rounds += 1
        self.real_tokens += batch.real_tokens
        self.computed_tokens += batch.computed_tokens
        self.telemetry.round_done(RoundRecord(keys, [t.key for t in waiting], batch.real_tokens, batch.computed_tokens, seconds))
        return True

    def run(self, should_stop=lambda: False) -> None:
        while not should_stop() and self.run_round():
            pass

    def _optimizer_step(self, rt: TaskRuntime) -> None:
        params = rt.adapter.parameters()
        max_norm = rt.task.spec.training.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        if not torch.isfinite(grad_norm):
            return self._fail(rt, f"gradient became non-finite at step {rt.step + 1}")
        lr = rt.optimizer.param_groups[0]["lr"]
        rt.optimizer.step()
        rt.scheduler.step()
        rt.optimizer.zero_grad(set_to_none=True)
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):  # one device sync
            return self._fail(rt, f"adapter weights became non-finite at step {rt.step + 1}")
        rt.step += 1
        rt.tokens_total += rt.step_tokens
        now = time.monotonic()
        seconds, rt.last_step_time = now - rt.last_step_time, now
        rt.last_loss = rt.step_loss_sum / rt.step_label_tokens
        rt.tokens_per_second = rt.step_tokens / seconds if seconds > 0 else None
        record = StepRecord(
            step=rt.step, loss=rt.last_loss, tokens=rt.step_tokens, label_tokens=rt.step_label_tokens,
            lr=lr, grad_norm=float(grad_norm), seconds=seconds, tokens_per_second=rt.tokens_per_second or 0.0,
            fused_with=sorted(rt.step_fused_with),
            effective_token_ratio=rt.step_real / max(1, rt.step_computed),
        )
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
        failed = False
        for p in picks:
            seqs = [PackedSequence(p.task.slot, ex) for ex in p.examples]
            alone = pack(seqs, None, self.backbone.device, attn_ratio=self.backbone.attn_ratio)
            with torch.no_grad():
                loss = float(self.backbone.forward_loss(alone).task_loss_sum[p.task.slot])
            if not math.isfinite(loss):
                self._fail(p.task, f"loss became non-finite at step {p.task.step + 1}")
                failed = True
        if not failed:
            self._solo_rounds = len(picks)  # never fused-only NaN: run them one by one, no loop


    # ----- outcomes ---------------------------------------------------------------------
    def _checkpoint(self, rt: TaskRuntime) -> None:
        t0 = time.perf_counter()
        try:
            rt.checkpoint = str(ckpt.save(rt, self.backbone.path))
            ok = True
        except OSError as exc:
            log.error("checkpoint failed", extra={"task": rt.key, "error": str(exc)})
            ok = False
        self.telemetry.checkpoint_done(rt, time.perf_counter() - t0, ok)

    def _finish(self, rt: TaskRuntime) -> None:
        save_adapter(rt.adapter, rt.out_dir, self.backbone.path)
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
        if phase != PENDING:
            try:
                rt.write_status()
            except OSError as exc:
                log.error("cannot write status", extra={"task": rt.key, "error": str(exc)})
        self.telemetry.task_phase(rt)
        return rt
