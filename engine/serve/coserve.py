"""The hybrid scheduler: each iteration runs the inference work first (decode tokens of the
requests in flight, then prefill chunks of new ones) and fills the rest of the iteration with
training tokens, as many as the SLO controller allows (`controller.py`).

Inference runs under torch.inference_mode in its own forward; the training round that follows is
the trainer's own fused forward/backward with a token budget, so training never holds inference
activations and trains exactly as it would alone (its steps only span more rounds). Without a
trainer (`muxtune serve`) the loop only serves.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from muxtune.engine.fair_queue import weight
from muxtune.engine.serve.adapters import served_name
from muxtune.engine.serve.controller import SloController
from muxtune.engine.serve.engine import ServeEngine
from muxtune.engine.serve.timeshare import TenantTimeShare, request_tenants, tenant_of

log = logging.getLogger("muxtune.serve")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # timings feed the controller: wait for the kernels they launched
        torch.cuda.synchronize(device)


class CoServer:
    FLOOR_DECAY = 0.98  # per iteration: the floor holds over the last ~50 iterations

    def __init__(self, engine: ServeEngine, controller: SloController, trainer=None, metrics=None,
                 train_floor: float = 0.1):
        self.engine, self.controller, self.trainer, self.metrics = engine, controller, trainer, metrics
        self.train_floor = train_floor
        self._train_s = self._all_s = 0.0  # decayed seconds of training and of all work
        self.floor_rounds = 0  # training rounds run past the SLO budget to keep the floor
        self.device = engine.backbone.device
        self._trained_last = False
        self.iterations = 0
        self._mean_seq: dict[str, float] = {}
        self.share = TenantTimeShare()  # one tenant's traffic cannot starve the others' training

    def _mean_sequence(self, rt) -> float:
        if rt.key not in self._mean_seq:
            ex = rt.stream.examples
            self._mean_seq[rt.key] = sum(len(e.input_ids) for e in ex) / max(1, len(ex))
        return self._mean_seq[rt.key]

    def _bound_leads(self) -> None:
        """No task carries more than one step's tokens (the largest step's) of lead over the
        least-served one into a round: service it got while rounds had room for everyone (training
        alone, an idle server) is not held against it once rounds get tight. Without this the fair
        queue made `copy` (long sequences, so more tokens a step) wait, under load, until its
        neighbours caught up on the thousands of tokens it led by: minutes (issue 20's soak)."""
        if self.trainer.group.world > 1:
            return  # every rank picks a round's sequences itself: a change on rank 0 alone would split them
        active = [rt for rt in self.trainer.active() if rt.stream is not None]
        if len(active) < 2:
            return
        keys = {rt.key: rt.served_tokens / weight(rt.priority) for rt in active}
        cap = min(keys.values()) + max(self._mean_sequence(rt) * rt.task.spec.training.batch_size for rt in active)
        for rt in active:
            if keys[rt.key] > cap:
                rt.served_tokens = int(cap * weight(rt.priority))

    def _next_sequence_tokens(self) -> int:
        """Tokens of the smallest sequence the trainer could run next: the least a round costs."""
        best = math.inf
        for rt in self.trainer.active():
            if rt.pending:
                best = min(best, len(rt.pending[0].input_ids))
            elif rt.stream is not None:
                best = min(best, self._mean_sequence(rt))
        return 0 if best is math.inf else int(best)

    FLOOR_EFFICIENCY = 4  # a floor round holds at least this many times its fixed cost's worth of tokens

    def _floor_budget(self) -> int:
        """Tokens of a round that brings training's share of the time back to the floor (the deficit's
        seconds, by the cost model): at least the next sequence, and enough that the round's fixed cost
        is a fifth of it at most, or rounds of one short sequence would keep the floor's time but
        little of its tokens (measured: 2-8% of training alone at a 0.1 floor)."""
        ctl, f = self.controller, self.train_floor
        deficit_s = max(0.0, (f * self._all_s - self._train_s) / (1 - f))
        a, b = ctl.train.coefficients()
        efficient = int(self.FLOOR_EFFICIENCY * a / b) if b > 0 else 0
        return max(self._next_sequence_tokens(), min(ctl.token_budget, max(efficient, ctl.train.tokens(deficit_s))))

    @property
    def train_share(self) -> float:
        """Training's share of the recent work time (1.0 before any work)."""
        return self._train_s / self._all_s if self._all_s > 0 else 1.0

    def training_active(self) -> bool:
        return self.trainer is not None and bool(self.trainer.active())

    def iteration(self) -> bool:
        """One hybrid iteration; False when there was nothing to do."""
        eng, ctl = self.engine, self.controller
        now = time.monotonic()
        due = {r: (r.first_token_at + ctl.slo.tpot_s * len(r.output_ids) if r.first_token_at is not None
                   else r.arrival + ctl.slo.ttft_s) for r in eng.running}
        stats = eng.step(ctl.prefill_budget(eng, now, eng.limits.max_prefill_tokens))
        if stats is not None:
            ctl.observe_inference(stats.decode_tokens + stats.prefill_tokens, stats.seconds)
            self.share.record_inference(now, stats.seconds, request_tenants(due))
            t = time.monotonic()
            late = sum(1 for r, d in due.items() if r.last_token_at is not None and r.last_token_at >= now and t > d)
            ctl.observe_tokens(late, self._trained_last)
        trained_tokens, train_seconds, by_task = 0, 0.0, {}
        if self.training_active():
            budget = ctl.train_budget(eng, time.monotonic())
            idle = not eng.has_work()
            if self.share.training_owed(time.monotonic(), {tenant_of(rt.key) for rt in self.trainer.active()}):
                budget, idle = ctl.token_budget, True  # over-share tenants' requests wait (timeshare.py)
            floor = not idle and self.train_share < self.train_floor
            if floor and budget < (catch_up := self._floor_budget()):
                # overload: the SLOs leave training too little; it still keeps its floor share of the time
                budget = catch_up
                self.floor_rounds += 1
            if idle or floor or ctl.worth_running(budget, self._next_sequence_tokens()):
                # with no request in flight training always advances, by one sequence at least, even
                # when the TTFT SLO is tighter than the smallest round (else it could never run)
                budget = max(budget, 1)
                self._bound_leads()
                before = {key: rt.served_tokens for key, rt in self.trainer.tasks.items()}
                real = self.trainer.real_tokens
                t0 = time.perf_counter()
                self.trainer.run_round(budget)
                _sync(self.device)
                train_seconds = time.perf_counter() - t0
                trained_tokens = self.trainer.real_tokens - real
                ctl.observe_training(trained_tokens, train_seconds)
                self.share.record_training(time.monotonic(), train_seconds)
                by_task = {served_name(rt.task): rt.served_tokens - before[key]
                           for key, rt in self.trainer.tasks.items() if rt.served_tokens != before.get(key, 0)}
        self._trained_last = trained_tokens > 0
        d = self.FLOOR_DECAY
        self._train_s = d * self._train_s + train_seconds
        self._all_s = d * self._all_s + train_seconds + (stats.seconds if stats is not None else 0.0)
        if self.metrics is not None:
            self.metrics.iteration(stats, by_task, train_seconds, eng.has_work())
        self.iterations += 1
        return stats is not None or trained_tokens > 0

    def wait(self, timeout: float) -> None:
        """Sleep until a request arrives (or timeout): nothing to run."""
        self.engine.wakeup.wait(timeout)
        self.engine.wakeup.clear()

    def run(self, should_stop, until_trained: bool = False) -> None:
        """Iterate until should_stop(); with until_trained, also stop once no task trains."""
        while not should_stop():
            if until_trained and not self.training_active():
                return
            if not self.iteration():
                self.wait(0.5)
