"""How many training tokens fit in this iteration without breaking the latency SLOs.

Each iteration the inference work runs first; training then gets the time left before the
earliest deadline of any request, converted to tokens by a cost model fitted online:

* deadlines, on a schedule tighter than the SLOs by a margin m (0.2-0.85): a request that has
  its first token must get its next one by first_token + n * m * TPOT_SLO (n tokens so far), which
  keeps its mean time per output token within m * TPOT_SLO; a request still waiting or prefilling
  must get its first token by arrival + m * TTFT_SLO minus its remaining prefill; with no request at
  all, one could arrive at any moment, so a round may last at most m * TTFT_SLO minus a typical prefill;
* time for training = earliest deadline - now - predicted time of the next inference forward,
  at most 3 TPOT SLOs (slack banked by fast decode iterations pays for larger rounds, but a stream
  never stalls longer than that);
* tokens = (time for training - a) / b, where `round seconds = a + b * tokens` is a least-squares
  fit of the measured training rounds, exponentially weighted so it follows changes in load
  (the same model, fitted on inference forwards, predicts the next inference forward);
* feedback: m shrinks by 0.7x whenever a token comes out after its deadline under the real SLO
  while training shared the iteration, and grows back by 0.02 per iteration that kept every
  deadline (AIMD, as TCP does with its window): the cost model's errors and load it cannot see are
  corrected by what the requests actually experienced, and the headroom 1 - m absorbs noise.

The trainer's granularity is one sequence, and a round has a fixed cost, so while requests are in
flight a budget below the next sequence or below the fixed cost's worth of tokens runs no training
that iteration (`worth_running`): the slack carries over to a larger round. With no request in flight and a loose TTFT SLO, training gets its full
token budget. The `temporal` policy is the baseline the benchmark compares against: training
runs a whole round only while no request is in flight or waiting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class LinearCost:
    """seconds = a + b * tokens, fitted by exponentially weighted least squares."""

    def __init__(self, decay: float = 0.9, b0: float = 1e-4):
        self.decay, self.b0 = decay, b0
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, tokens: float, seconds: float) -> None:
        d = self.decay
        self.w, self.sx, self.sy = d * self.w + 1, d * self.sx + tokens, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + tokens * tokens, d * self.sxy + tokens * seconds

    @property
    def fitted(self) -> bool:
        return self.w > 0

    def coefficients(self) -> tuple[float, float]:
        if not self.w:
            return 0.0, self.b0
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var > 1e-9 * max(1.0, mx * mx):
            b = (self.sxy / self.w - mx * my) / var
            a = my - b * mx
            if b > 0 and a >= 0:
                return a, b
        return 0.0, my / max(mx, 1.0)  # too little spread (or a fit through a negative intercept): proportional

    def seconds(self, tokens: float) -> float:
        a, b = self.coefficients()
        return a + b * tokens

    def tokens(self, seconds: float) -> int:
        a, b = self.coefficients()
        return max(0, int((seconds - a) / b)) if seconds > a else 0


@dataclass
class Slo:
    tpot_s: float
    ttft_s: float


class SloController:
    MARGIN_MIN, MARGIN_MAX = 0.2, 0.85  # below 1: room for the cost model's error and the machine's noise
    MAX_STALL = 3.0  # a training round between two tokens of a stream lasts at most this many TPOT SLOs

    def __init__(self, slo: Slo, token_budget: int, policy: str = "coserve", min_prefill: int = 16):
        if policy not in ("coserve", "temporal"):
            raise ValueError(f"unknown co-serving policy {policy!r}")
        self.slo, self.token_budget, self.policy, self.min_prefill = slo, token_budget, policy, min_prefill
        self.train = LinearCost()
        self.infer = LinearCost(b0=2e-5)
        self.margin = 0.7
        self.last_budget = token_budget
        self.late_tokens = 0  # tokens emitted after their deadline (diagnostics)

    # ----- deadlines -----------------------------------------------------------------------
    def earliest_deadline(self, engine, now: float) -> float:
        """When the next token (or a first token) is due on the margin's schedule, over every request."""
        due = math.inf
        s = self.slo
        for r in engine.running:
            if r.first_token_at is not None:
                due = min(due, r.first_token_at + self.margin * s.tpot_s * len(r.output_ids))
            else:
                due = min(due, r.arrival + self.margin * s.ttft_s - self.infer.seconds(len(r.prompt_ids) - r.prefilled))
        for r in list(engine.waiting):
            due = min(due, r.arrival + self.margin * s.ttft_s - self.infer.seconds(len(r.prompt_ids)))
        return due

    def prefill_budget(self, engine, now: float, max_prefill: int) -> int:
        """Prompt tokens this iteration: all it may while no token is due sooner than the chunk takes."""
        decoding = [r for r in engine.running if r.first_token_at is not None]
        if not decoding:
            return max_prefill
        due = min(r.first_token_at + self.margin * self.slo.tpot_s * len(r.output_ids) for r in decoding)
        spare = due - now - self.infer.seconds(len(decoding))
        per_token = self.infer.coefficients()[1]
        return max(self.min_prefill, min(max_prefill, int(spare / per_token) if spare > 0 else 0))

    # ----- training budget -------------------------------------------------------------------
    def train_budget(self, engine, now: float) -> int:
        """Training tokens to run now (0: skip training this iteration)."""
        busy = engine.has_work()
        if self.policy == "temporal":
            self.last_budget = 0 if busy else self.token_budget
            return self.last_budget
        if busy:
            due = self.earliest_deadline(engine, now)
            decode = sum(1 for r in engine.running if r.first_token_at is not None)
            prefill = sum(len(r.prompt_ids) - r.prefilled for r in engine.running if r.first_token_at is None)
            next_inference = self.infer.seconds(decode + min(prefill, 512))
            # banked slack may pay for a longer round, but no stream stalls more than MAX_STALL TPOTs
            spare = min(due - now - next_inference, self.MAX_STALL * self.slo.tpot_s)
        else:
            spare = self.slo.ttft_s * self.margin - self.infer.seconds(engine.prompt_tokens_mean)
        self.last_budget = min(self.token_budget, self.train.tokens(spare)) if spare > 0 else 0
        return self.last_budget

    def worth_running(self, budget: int, next_sequence: int) -> bool:
        """Whether a round of `budget` tokens is worth running while requests are in flight: it must
        hold the next sequence, and spend at least as long on tokens as on the round's fixed cost
        (a / b tokens). Smaller rounds are skipped: decode iterations then run back to back, ahead of
        their schedule, and the slack they bank pays for a larger round soon after."""
        a, b = self.train.coefficients()
        return budget > 0 and budget >= max(next_sequence, int(a / b) if b > 0 else 0)

    # ----- feedback ---------------------------------------------------------------------------
    def observe_inference(self, tokens: int, seconds: float) -> None:
        if tokens:
            self.infer.observe(tokens, seconds)

    def observe_training(self, tokens: int, seconds: float) -> None:
        if tokens:
            self.train.observe(tokens, seconds)

    def observe_tokens(self, late: int, trained: bool) -> None:
        """After an iteration's tokens went out: late ones (past their deadline) shrink the margin."""
        self.late_tokens += late
        if late and trained:
            self.margin = max(self.MARGIN_MIN, self.margin * 0.7)
        elif not late:
            self.margin = min(self.MARGIN_MAX, self.margin + 0.02)
