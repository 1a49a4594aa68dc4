"""Per-tenant time share (engine/serve/timeshare.py): one tenant's burst of requests and tight SLOs
cannot take more than its share of a co-serving group's time from another tenant's training."""
from __future__ import annotations

from types import SimpleNamespace

from muxtune.engine.serve.timeshare import TenantTimeShare, request_tenants, tenant_of


def test_tenants_of_requests_and_tasks():
    reqs = [SimpleNamespace(model=SimpleNamespace(task_key="team-a/chat", name="team-a/chat")),
            SimpleNamespace(model=SimpleNamespace(task_key=None, name="builtin:tiny-llama"))]
    assert request_tenants(reqs) == ["team-a", ""] and request_tenants([]) == [""]
    assert tenant_of("team-b/train") == "team-b"


def test_a_serving_burst_owes_the_other_tenant_its_training_share():
    share = TenantTimeShare(window_s=10)
    # team-a's requests took 9 s of the last 10, team-b's training 1 s: team-b is owed training
    for i in range(9):
        share.record_inference(float(i), 1.0, ["team-a"])
    share.record_training(9.0, 1.0)
    assert share.training_owed(9.5, {"team-b"})
    # once team-b trained its half, inference goes first again
    share.record_training(9.6, 8.0)  # 9 s of 18: its half
    assert not share.training_owed(9.7, {"team-b"})


def test_nothing_is_owed_within_shares_or_to_the_busy_tenant_itself():
    share = TenantTimeShare(window_s=10)
    for i in range(9):
        share.record_inference(float(i), 1.0, ["team-a"])
    share.record_training(9.0, 1.0)
    assert not share.training_owed(9.5, {"team-a"})  # its own training: the SLO controller decides
    even = TenantTimeShare(window_s=10)
    even.record_inference(0.0, 2.0, ["team-a"])
    even.record_training(1.0, 3.0)
    assert not even.training_owed(2.0, {"team-b"})  # team-a within its share
    even.record_inference(0.0, 30.0, ["team-a"])
    assert not even.training_owed(20.0, {"team-b"})  # outside the window: forgotten


class _Request(SimpleNamespace):
    __hash__ = object.__hash__  # the loop keys requests by identity


class _BusyEngine:
    """A serve engine under a never-ending burst of team-a requests whose SLOs leave no room for
    training; each iteration's inference is reported as taking 50 ms. (A fake: the point is the
    co-serving loop's decision, not generation.)"""

    def __init__(self):
        from muxtune.engine.serve.engine import InferenceStats

        now = __import__("time").monotonic()
        req = _Request(model=SimpleNamespace(task_key="team-a/chat", name="team-a/chat"), first_token_at=now,
                              output_ids=[1] * 4, arrival=now, last_token_at=None, prompt_ids=[1], prefilled=1)
        self.running, self.waiting = [req], []
        self.backbone = SimpleNamespace(device=__import__("torch").device("cpu"))
        self.limits = SimpleNamespace(max_prefill_tokens=512)
        self.prompt_tokens_mean = 8.0
        self.stats = InferenceStats(**{f: 0 for f in InferenceStats.__dataclass_fields__} | {"seconds": 0.05,
                                                                                          "decode_tokens": 1})

    def step(self, budget):
        return self.stats

    def has_work(self):
        return True


class _Trainer:
    def __init__(self):
        self.rounds, self.real_tokens = [], 0
        self.group = SimpleNamespace(world=1)  # one process (the co-serving loop asks, as MuxTrainer.group answers)
        self.tasks = {"team-b/train": SimpleNamespace(key="team-b/train", served_tokens=0, pending=[],
                                                      stream=None, task=None)}

    def active(self):
        return list(self.tasks.values())

    def run_round(self, budget):
        self.rounds.append(budget)
        self.real_tokens += budget


def test_a_tenants_burst_with_tight_slos_does_not_stop_another_tenants_training():
    """team-a's requests with a 0.001 ms TPOT SLO would leave team-b's training no round at all;
    its time share makes the co-serving loop train whenever team-b is below its share."""
    from muxtune.engine.serve.controller import Slo, SloController
    from muxtune.engine.serve.coserve import CoServer

    ctl = SloController(Slo(tpot_s=1e-6, ttft_s=1e-6), token_budget=256)
    co = CoServer(_BusyEngine(), ctl, trainer=_Trainer())
    for _ in range(40):
        co.iteration()
    assert co.trainer.rounds and all(b == 256 for b in co.trainer.rounds)
