"""The SLO controller's arithmetic: the online cost model, deadlines -> training tokens, the
prefill chunk, the AIMD margin, and the temporal-sharing baseline (no model needed: the engine
state is a plain container of real requests)."""
from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest

from muxtune.engine.serve.controller import LinearCost, Slo, SloController
from muxtune.engine.serve.request import GenerationRequest
from muxtune.engine.serve.sampling import SamplingParams


def engine_state(running=(), waiting=()):
    running, waiting = list(running), deque(waiting)
    return SimpleNamespace(running=running, waiting=waiting, prompt_tokens_mean=20.0,
                           has_work=lambda: bool(running or waiting))


def request(now, *, arrival_ago=0.0, first_ago=None, tokens=0, prompt=20, prefilled=None):
    r = GenerationRequest(model=None, prompt_ids=[1] * prompt, params=SamplingParams(max_tokens=100), sink=print)
    r.arrival = now - arrival_ago
    r.prefilled = prompt if prefilled is None else prefilled
    if first_ago is not None:
        r.first_token_at = now - first_ago
        r.output_ids = [5] * tokens
    return r


def fitted(ctl, a=0.01, b=1e-4, ia=0.002, ib=1e-5):
    for n in (100, 300, 600, 1000, 2000):
        ctl.train.observe(n, a + b * n)
        ctl.infer.observe(n // 10, ia + ib * (n // 10))
    return ctl


def test_linear_cost_fits_intercept_and_slope():
    c = LinearCost()
    for n in (100, 200, 400, 800, 1600):
        c.observe(n, 0.02 + 5e-5 * n)
    a, b = c.coefficients()
    assert a == pytest.approx(0.02, rel=1e-6) and b == pytest.approx(5e-5, rel=1e-6)
    assert c.tokens(0.02 + 5e-5 * 1000) == pytest.approx(1000, abs=1)
    assert c.tokens(0.01) == 0  # less time than the fixed cost: nothing fits
    d = LinearCost()
    for _ in range(3):
        d.observe(500, 0.05)  # one size only: proportional
    assert d.tokens(0.1) == 1000


def test_idle_budget_leaves_room_for_an_arrival_within_ttft():
    ctl = fitted(SloController(Slo(tpot_s=0.1, ttft_s=0.5), token_budget=100_000))
    budget = ctl.train_budget(engine_state(), now=100.0)
    spare = 0.5 * ctl.margin - ctl.infer.seconds(20)
    assert budget == ctl.train.tokens(spare) and 0 < budget < 100_000
    assert SloController(Slo(0.1, 100.0), token_budget=4096).train_budget(engine_state(), 0.0) == 4096  # capped


def test_busy_budget_follows_the_earliest_deadline():
    now = 100.0
    ctl = fitted(SloController(Slo(tpot_s=0.1, ttft_s=1.0), token_budget=100_000))
    # 10 tokens in 0.5 s at a 0.1 s TPOT SLO: well ahead of schedule
    relaxed = engine_state([request(now, arrival_ago=1, first_ago=0.5, tokens=10)])
    b_relaxed = ctl.train_budget(relaxed, now)
    # 10 tokens, 0.5 s after the first: on the margin's schedule the next is due at -0.5 + m * 0.1 * 10
    assert b_relaxed == ctl.train.tokens(-0.5 + ctl.margin * 1.0 - ctl.infer.seconds(1)) > 0
    # a second request whose next token is already due leaves nothing for training
    tight = engine_state([*relaxed.running, request(now, arrival_ago=1, first_ago=0.095, tokens=1)])
    assert ctl.train_budget(tight, now) == 0
    # a request waiting for its first token: its TTFT deadline counts
    waiting = engine_state(waiting=[request(now, arrival_ago=0.9, prefilled=0)])
    assert ctl.train_budget(waiting, now) < b_relaxed


def test_prefill_chunk_shrinks_when_decode_tokens_are_due():
    now = 50.0
    ctl = fitted(SloController(Slo(tpot_s=0.1, ttft_s=1.0), token_budget=4096, min_prefill=16))
    assert ctl.prefill_budget(engine_state(), now, 512) == 512
    due_soon = engine_state([request(now, first_ago=0.099, tokens=1)])
    assert ctl.prefill_budget(due_soon, now, 512) == 16
    later = engine_state([request(now, first_ago=0.1, tokens=3)])
    assert 16 < ctl.prefill_budget(later, now, 512) <= 512


def test_margin_is_aimd_on_late_tokens():
    ctl = SloController(Slo(0.1, 1.0), token_budget=4096)
    m = ctl.margin
    ctl.observe_tokens(late=2, trained=True)
    assert ctl.margin == pytest.approx(m * 0.7)
    ctl.observe_tokens(late=0, trained=True)
    assert ctl.margin == pytest.approx(m * 0.7 + 0.02)
    ctl.observe_tokens(late=1, trained=False)  # late without training in the way: not training's fault
    assert ctl.margin == pytest.approx(m * 0.7 + 0.02)
    for _ in range(20):
        ctl.observe_tokens(late=3, trained=True)
    assert ctl.margin == ctl.MARGIN_MIN
    for _ in range(100):
        ctl.observe_tokens(late=0, trained=True)
    assert ctl.margin == ctl.MARGIN_MAX


def test_temporal_policy_trains_only_when_no_request_is_in_flight():
    now = 10.0
    ctl = SloController(Slo(0.1, 1.0), token_budget=777, policy="temporal")
    assert ctl.train_budget(engine_state(), now) == 777
    assert ctl.train_budget(engine_state(waiting=[request(now)]), now) == 0
    assert ctl.train_budget(engine_state([request(now, first_ago=5, tokens=100)]), now) == 0
    with pytest.raises(ValueError):
        SloController(Slo(0.1, 1.0), 10, policy="sometimes")


def test_rounds_too_small_to_pay_their_fixed_cost_wait_and_stalls_are_capped():
    now = 5.0
    ctl = fitted(SloController(Slo(tpot_s=0.1, ttft_s=10.0), token_budget=100_000), a=0.05, b=1e-4)
    a, b = ctl.train.coefficients()
    assert not ctl.worth_running(int(a / b) - 1, next_sequence=10)  # more fixed cost than work: wait
    assert ctl.worth_running(int(a / b), next_sequence=10)
    assert not ctl.worth_running(int(a / b), next_sequence=int(a / b) + 1)  # the next sequence would not fit
    assert not ctl.worth_running(0, next_sequence=0)
    # a request far ahead of its schedule banks slack, but one round lasts at most MAX_STALL TPOT SLOs
    ahead = engine_state([request(now, arrival_ago=30, first_ago=20, tokens=1000)])
    assert ctl.train_budget(ahead, now) == ctl.train.tokens(ctl.MAX_STALL * 0.1)
