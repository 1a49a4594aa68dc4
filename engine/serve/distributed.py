"""Serving over a parallel group (dp x tp x pp > 1): rank 0 fronts the API and decides, every rank
runs its part of each forward.

Rank 0 runs the whole serving stack (HTTP, queue, SLO controller, sampling, the adapter registry)
over its own part of the backbone. The other ranks run a Follower (follower.py) that does what
rank 0 decided, in the same order. Each decision crosses as one broadcast from rank 0 over a gloo
control group of its own, with a timeout:

- FORWARD (the iteration's work items and rank 0's live adapter versions): every rank of data-
  parallel replica 0 runs the serving forward of its part. Under tp each rank computes its block
  of heads (its KV cache holds those heads only) and the regions' all-reduces make every rank's
  output whole; under pp the hidden states go stage to stage (point to point, as training's
  pipeline does) and the last stage sends the logits back to rank 0, which samples.
- TRAIN (a token budget): co-serving's training round, which every rank runs (its collectives
  already keep the group together). Rank 0 decides when and how much; nobody else decides.
- END (whether the iteration did anything): rank 0's iteration is over, so every rank returns
  from it together and the caller's next collective (`--watch`'s agreement) lines up.
- LEAVE: rank 0's serving loop returned (stop, or training done): every rank's returns.

Data parallelism: replica 0 serves, the other replicas train only. Replicas hold the same weights,
so another replica would add throughput, not answers; but rank 0 would then split every
iteration's batch, keep KV rows on each replica and gather their logits, and in a cluster each
replica is another pod: a network round trip per generated token, for a group whose iterations
are paced by the training round they all run together anyway. vLLM scales the same way: data-
parallel engines behind a load balancer, not one engine spread over replicas.

Failures: a rank that fails exits (run.py records its error first); its peers' collectives then
fail (gloo: at once; the control group's timeout bounds a stuck peer) and rank 0 stops serving
(503s), so nothing hangs. A forward that fails on rank 0 breaks the group likewise: its peers may
be inside that forward's collectives, so nothing after it could line up.
"""
from __future__ import annotations

import datetime
from typing import Callable

import torch

from muxtune.engine.serve.coserve import CoServer
from muxtune.engine.serve.forward import InferenceForward, WorkItem

FORWARD, TRAIN, END, LEAVE = "forward", "train", "end", "leave"
CONTROL_TIMEOUT_S = 600  # a rank waits this long for rank 0's next decision (rank 0 sends one per iteration)


class GroupBroken(RuntimeError):
    """The serving group cannot go on (a rank failed, or a forward failed midway); the message says why."""


class ControlChannel:
    """Rank 0's decisions to every rank: one broadcast each over a gloo group of the whole world."""

    def __init__(self, group, timeout_s: float = CONTROL_TIMEOUT_S):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        # a collective of every rank (each calls this at the same point); gloo whatever the backend:
        # decisions are small Python objects
        self.pg = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def send(self, kind: str, payload=None) -> None:
        self.dist.broadcast_object_list([(kind, payload)], src=0, group=self.pg)

    def recv(self) -> tuple[str, object]:
        box = [None]
        self.dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]


class StageLinks:
    """One serving forward over the pipeline: receive the previous stage's hidden states, run this
    stage, send them on; the last stage of replica 0 sends the logits to rank 0."""

    def __init__(self, group):
        import torch.distributed as dist

        self.dist, self.g = dist, group
        self.logits_rank = group.dims.rank_of(group.dims.pp - 1, 0, 0)  # last stage, replica 0, tp rank 0

    def forward(self, fwd: InferenceForward, items: list[WorkItem]) -> torch.Tensor | None:
        """This rank's part of the forward of items; the logits on rank 0, None elsewhere."""
        g, dist, bb = self.g, self.dist, fwd.backbone
        batch = fwd.prepare(items)
        hidden = None
        if not g.first_stage:
            hidden = torch.empty(batch.tokens, bb.model.config.hidden_size, dtype=bb.dtype, device=g.device)
            dist.recv(hidden, src=g.prev_rank)
            hidden = hidden.to(bb.device)
        out = fwd.run(batch, hidden)
        if not g.last_stage:
            dist.send(out.to(g.device).contiguous(), dst=g.next_rank)
        elif g.rank == self.logits_rank and g.rank != 0:
            dist.send(out.to(g.device).contiguous(), dst=0)
        if g.rank != 0:
            return None
        if g.last_stage:
            return out
        logits = torch.empty(batch.wanted.numel(), bb.lm_head.weight.shape[0], dtype=torch.float32, device=g.device)
        dist.recv(logits, src=self.logits_rank)
        return logits.to(bb.device)


class VersionTable:
    """Rank 0's live adapter versions as the followers mirror them: {slot: (uid, source)}, the source
    being where a follower takes the same weights from: ("task", key, step) a training task's
    adapter after that step, ("dir", path) an adapter directory, ("version", name) one no entry holds
    as newest any more (a follower made it while it was). A slot reused by a new version gets a new uid."""

    def __init__(self, registry):
        self.registry = registry
        self._seen: dict[int, tuple[object, int]] = {}  # slot -> (version, uid); holds the version, so ids stay unique
        self._next = 0

    def live(self) -> dict[int, tuple[int, tuple]]:
        reg = self.registry  # its tables, read on the engine thread, which alone changes versions
        with reg._lock:
            entries = {id(m.current): m for m in reg._models.values() if m.current is not None}
        out = {}
        for slot, v in reg._versions.items():
            seen = self._seen.get(slot)
            if seen is None or seen[0] is not v:
                self._next += 1
                seen = self._seen[slot] = (v, self._next)
            m = entries.get(id(v))
            if m is None:
                source = ("version", v.model)
            elif m.task_key is not None:
                source = ("task", m.task_key, v.step)
            else:
                source = ("dir", str(m.path))
            out[slot] = (seen[1], source)
        for slot in set(self._seen) - set(out):
            del self._seen[slot]
        return out


class LeaderForward:
    """Rank 0's serving forward: the decision to every rank, then its own part (engine.forward)."""

    def __init__(self, local: InferenceForward, channel: ControlChannel, links: StageLinks, registry):
        self.local, self.channel, self.links, self.versions = local, channel, links, VersionTable(registry)
        self.backbone, self.pool = local.backbone, local.pool
        self.broken: str | None = None

    def __call__(self, items: list[WorkItem]) -> torch.Tensor:
        self.local.prepare(items)  # a bad item (past the KV rows) fails its requests here, before anything crosses
        try:
            self.channel.send(FORWARD, (items, self.versions.live()))
            return self.links.forward(self.local, items)
        except Exception as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            raise


class _BroadcastRounds:
    """The trainer as co-serving sees it on rank 0: each round it runs is announced to every rank first."""

    def __init__(self, trainer, channel: ControlChannel):
        self._trainer, self._channel = trainer, channel

    def run_round(self, token_budget: int | None = None):
        self._channel.send(TRAIN, token_budget)
        return self._trainer.run_round(token_budget)

    def __getattr__(self, name):
        return getattr(self._trainer, name)


class LeaderLoop(CoServer):
    """The hybrid loop on rank 0 of a group: CoServer's decisions, announced to every rank."""

    def __init__(self, engine, controller, trainer=None, metrics=None, train_floor: float = 0.1, *,
                 channel: ControlChannel, group):
        super().__init__(engine, controller, trainer, metrics, train_floor=train_floor)
        self.channel, self.group = channel, group
        self.forward = engine.forward = LeaderForward(engine.forward, channel, StageLinks(group), engine.registry)
        if trainer is not None:
            self.trainer = _BroadcastRounds(trainer, channel)
        step = engine.step

        def checked_step(*args, **kwargs):  # a forward that broke the group ends the loop, not just its requests
            stats = step(*args, **kwargs)
            if self.forward.broken:
                raise GroupBroken(group.record_error(f"serving forward failed: {self.forward.broken}"))
            return stats

        engine.step = checked_step

    def iteration(self) -> bool:
        busy = super().iteration()  # raising, rank 0 ends: the others' next collective fails with it
        self.channel.send(END, busy)
        return busy

    def run(self, should_stop, until_trained: bool = False) -> None:
        super().run(should_stop, until_trained)
        self.channel.send(LEAVE)


def serve_in_group(group, lead: Callable[[ControlChannel], object], follow: Callable[[ControlChannel], object]):
    """Every rank's part of serving (lead on rank 0, follow elsewhere), or, if any rank could not
    start it, the first rank's reason raised on every rank (GroupBroken) with nothing left running."""
    channel = ControlChannel(group)
    built, error = None, None
    try:
        built = lead(channel) if group.is_writer else follow(channel)
    except Exception as exc:  # noqa: BLE001 - agreed below, then raised everywhere
        error = f"serving cannot start: {exc}"
    if (error := group.first_error(error)) is not None:
        if built is not None:
            built.close(error)
        raise GroupBroken(error)
    return built
