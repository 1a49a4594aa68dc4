"""The operator's level-triggered reconciler.

One reconcile pass reads the whole world from kopf's in-memory indices (kept current by watches),
derives every desired object from it, and writes only differences. Its phases, in order:

1. observe: one Snapshot (operator/snapshot.py) of tasks, groups, pods, ConfigMaps, Services,
   BaseModels, namespaces and nodes; every later phase decides from it.
2. membership: a BackboneGroup's spec.tasks is the source of truth. Members that were deleted,
   suspended, finished (Succeeded/Failed), refused, re-created under another uid, or listed twice leave.
3. plan: pending tasks (in no group, not suspended, not terminal, valid) go to the pure planner with
   the groups' remaining members and the free GPUs per node.
4. apply: the GroupApplier (operator/groups.py) creates/patches groups, their ConfigMap (member
   tasks as the engine reads them), headless Service and Pods, and deletes groups left without
   members (children first, then the group). Creates answer 409 on a deterministic name after a
   restart: the existing object is adopted.
5. status: BaseModels' readiness, then every task's status is recomputed (status.compute_status)
   and patched when it differs; an Event is posted per transition.
6. metrics.

A second loop polls each running group's engine (/v1/status, operator/poller.py) and feeds the
reports into the status phase. Our own writes are kept in an overlay (operator/overlay.py) until
the watch shows them, so a pass that runs before the watch caught up neither repeats nor
contradicts the previous one. With leader election (operator/leader.py) only the Lease holder
runs either loop; the others keep their caches warm.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from datetime import datetime, timezone
from typing import Any, Mapping

from muxtune.api.meta import GROUP, VERSION
from muxtune.operator import fairshare, gang, kueue, metrics, quota, resources, status
from muxtune.operator.config import (
    ANN_GPU_MEMORY,
    KUEUE_QUEUE_LABEL,
    LABEL_GROUP,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    OperatorConfig,
)
from muxtune.operator.events import EventSink
from muxtune.operator.groups import GroupApplier, PodBackoff, subset
from muxtune.operator.keys import GroupKeys
from muxtune.operator.kube import ApiError, KubeClient
from muxtune.operator.overlay import Overlay
from muxtune.operator.planner import GroupPlan, Plan, plan as run_planner
from muxtune.operator.podspec import serving_endpoint
from muxtune.operator.poller import EnginePoller
from muxtune.operator.repacker import Repacker
from muxtune.operator.slofloor import SloFloors
from muxtune.operator.snapshot import (
    GroupKey,
    Membership,
    Snapshot,
    deleting,
    group_failed,
    membership,
    pending_requests,
    pods_by_group,
    pods_by_job,
    unbound_pods,
)
from muxtune.operator.transfer_plan import TransferPlan, plan_transfers
from muxtune.operator.world import (
    basemodel_architecture, basemodel_figures, group_started, group_state, node_inventory, parse_task)

log = logging.getLogger("muxtune.operator")
API = f"{GROUP}/{VERSION}"
IDX_TASKS, IDX_GROUPS, IDX_MODELS = "muxtune_tasks", "muxtune_groups", "muxtune_basemodels"
IDX_NODES, IDX_PODS, IDX_CMS, IDX_SVCS = "muxtune_nodes", "muxtune_pods", "muxtune_configmaps", "muxtune_services"
IDX_NAMESPACES = "muxtune_namespaces"
IDX_JOBS = "muxtune_jobs"


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _by_name(idx: Mapping) -> dict:
    """Cluster-scoped index entries by name (kopf keys them by name or by (None, name))."""
    return {(k if isinstance(k, str) else k[1]): v for k, v in idx.items()}


class Controller:
    def __init__(self, config: OperatorConfig, client: KubeClient, keys: GroupKeys | None = None, elector=None):
        self.config = config
        self.client = client
        client.writable_namespaces = config.watched
        self.keys = keys or GroupKeys.from_file(config.signing_key_file)
        self.poller = EnginePoller(config, self.keys.key)
        self.backoff = PodBackoff(config.pod_backoff_base, config.pod_backoff_cap)
        self.elector = elector
        self.indices: Mapping[str, Any] | None = None
        self.ready = False
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()
        self.overlay = Overlay()
        self.events = EventSink(client, socket.gethostname())
        self._parse_cache: dict[tuple[str, str], Any] = {}
        self.last_plan: Plan | None = None
        self.gang: dict[GroupKey, gang.Decision] = {}  # this pass's decision per group
        self.gang_fits: dict[GroupKey, tuple[bool, str]] = {}  # whether a group's pods all fit now
        self.workload_msgs: dict[GroupKey, str] = {}  # why Kueue holds a group back
        self.applier = GroupApplier(client=client, config=config, keys=self.keys, events=self.events,
                                    overlay=self.overlay, backoff=self.backoff, poller=self.poller, kick=self.kick,
                                    decisions=self.gang, workload_msgs=self.workload_msgs)
        self.repacker = Repacker(config.repack_max_moves, config.repack_interval, config.repack_task_cooldown)
        self._held: set[str] = set()  # tasks moving between groups whose checkpoint is not written yet
        self.passes = 0
        self.errors = 0
        self._tasks: list[asyncio.Task] = []
        self._sem = asyncio.Semaphore(max(1, config.api_concurrency))

    @property
    def reports(self) -> dict[str, dict]:
        """task key -> the engine's latest verified entry"""
        return self.poller.reports

    def leading(self) -> bool:
        return self.elector is None or self.elector.is_leader

    # ------------------------------------------------------------------ lifecycle

    def attach(self, indices: Mapping[str, Any]) -> None:
        self.indices = indices

    def forget(self, plural: str, namespace: str | None, name: str) -> None:
        """The watch saw the object deleted: our remembered write of it is void."""
        self.overlay.forget(plural, namespace, name)

    def kick(self) -> None:
        self._kick.set()

    def mark_ready(self) -> None:
        """Called from resource handlers: kopf runs them only after every index is populated."""
        if not self.ready:
            self.ready = True
            log.info("indices populated; reconciling")
        self._kick.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._reconcile_loop(), name="muxtune-reconcile"),
                       asyncio.create_task(self._poll_loop(), name="muxtune-poll")]
        if self.elector is not None:
            self._tasks.append(asyncio.create_task(self.elector.run(), name="muxtune-lease"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.elector is not None:
            await self.elector.release()
        await self.client.close()

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=self.config.resync_interval)
            except asyncio.TimeoutError:
                pass
            if not self.ready or self.indices is None or not self.leading():
                continue
            await asyncio.sleep(self.config.debounce)  # coalesce bursts of watch events
            self._kick.clear()
            await self.reconcile_once()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            if not self.ready or self.indices is None or not self.leading():
                continue
            try:
                if await self.poll_once():
                    self.kick()
            except Exception:  # noqa: BLE001 - a poll failure must not stop the loop
                log.exception("polling engines failed")

    # ------------------------------------------------------------------ world

    def _index(self, name: str) -> dict:
        out: dict = {}
        idx = (self.indices or {}).get(name)
        if idx is None:
            return out
        for k, store in list(idx.items()):
            for v in store:
                out[k] = v
        return out

    def _view(self, plural: str, index_name: str) -> dict[tuple[str, str], dict]:
        """The index as (namespace, name) -> object, with our own writes the watch has not shown yet."""
        objs = {(k if isinstance(k, tuple) else ("", k)): v for k, v in self._index(index_name).items()}
        return self.overlay.lay_over(plural, objs)

    def _parsed(self, obj: dict):
        m = obj["metadata"]
        ck = (m.get("uid") or m["name"], str(m.get("generation")))
        if ck not in self._parse_cache:
            if len(self._parse_cache) > 20000:
                self._parse_cache.clear()
            self._parse_cache[ck] = parse_task(obj)
        return self._parse_cache[ck]

    # ------------------------------------------------------------------ reconcile

    async def reconcile_once(self) -> None:
        async with self._lock:
            t0 = time.perf_counter()
            try:
                await self._reconcile()
            except Exception:  # noqa: BLE001
                metrics.RECONCILE_ERRORS.inc()
                self.errors += 1
                log.exception("reconcile pass failed")
                self._kick.set()
            finally:
                self.passes += 1
                metrics.RECONCILE.observe(time.perf_counter() - t0)

    async def _reconcile(self) -> None:
        """One pass, as ordered phases over one snapshot of the world."""
        snap = self._observe()
        tplan = self._plan_transfers(snap)
        ms = self._membership(snap, tplan)
        self._repack_settle(snap, ms)
        plan = self._repack(snap, ms, await self._charge_quotas(snap, ms, self._plan(snap, ms)))
        results = await self._apply(snap, ms, plan, tplan)
        await self._basemodel_status(snap, tplan)
        counts = await self._task_status(snap, ms, plan, tplan)
        _record_metrics(snap, plan, counts)
        if any(r is False for r in results):
            self._kick.set()  # something failed: try again after the debounce

    def _observe(self) -> Snapshot:
        """Read the indices (with our own writes laid over them) once, so that every phase decides
        from the same world; reports of tasks and groups that are gone are dropped."""
        cfg = self.config
        now = utcnow()
        tasks = self._view("finetunetasks", IDX_TASKS)
        groups = self._view("backbonegroups", IDX_GROUPS)
        pods = self._view("pods", IDX_PODS)
        cms = self._view("configmaps", IDX_CMS)
        svcs = self._view("services", IDX_SVCS)
        bms = _by_name(self._index(IDX_MODELS))
        by_key = {f"{ns}/{name}": obj for (ns, name), obj in tasks.items() if cfg.watched is None or ns in cfg.watched}
        self.poller.forget(set(by_key), set(groups))
        group_objs = dict(sorted(groups.items(), key=lambda kv: kv[0][1]))
        # names still in use by terminating groups (ours or as the watch last saw them)
        reserved = {k[1] for k in self._index(IDX_GROUPS)} | self.overlay.names("backbonegroups")
        reserved |= {gk[1] for gk, g in group_objs.items() if deleting(g)}
        return Snapshot(
            now=now, tasks=by_key, groups=group_objs, pods_of=pods_by_group(pods), configmaps=cms, services=svcs,
            jobs=self._view("jobs", IDX_JOBS), job_pods=pods_by_job(pods),
            inventory=node_inventory(self._index(IDX_NODES).values(), pods.values()), basemodels=bms,
            architectures={name: basemodel_architecture(bm) for name, bm in bms.items()},
            namespace_labels=_by_name(self._index(IDX_NAMESPACES)), reserved_names=frozenset(reserved),
            planner_config=cfg.planner_config(), slo_floors=SloFloors(cfg.min_slo_ttft_ms, cfg.min_slo_tpot_ms))

    def _plan_transfers(self, snap: Snapshot) -> TransferPlan:
        """Remote data (operator/transfer_plan.py): staging Jobs before placement, export Jobs after
        Succeeded, model caches; the tasks it holds back are neither planned nor kept in a group."""
        tasks = {k: (o, self._parsed(o)) for k, o in snap.tasks.items()}
        return plan_transfers(tasks, dict(snap.basemodels), dict(snap.jobs), dict(snap.job_pods), self.config)

    def _membership(self, snap: Snapshot, tplan: TransferPlan) -> Membership:
        """Who stays in which group; the rest that is placeable goes to the planner."""
        return membership(snap, {k: self._parsed(o) for k, o in snap.tasks.items()}, holds=tplan.holds)

    def _plan(self, snap: Snapshot, ms: Membership) -> Plan:
        """Run the pure planner on the pending tasks, the groups' remaining members and free GPUs."""
        states = self._group_states(snap, ms)
        pending = self._pending(snap, ms)
        t0 = time.perf_counter()

        def run(tasks, dropped):  # the planner, with preempted members out of their groups
            return run_planner(tasks, [fairshare.without_members(s, dropped) for s in states] if dropped else states,
                               snap.inventory, snap.architectures, snap.planner_config,
                               reserved_names=snap.reserved_names)

        releasing = any(deleting(g) for g in snap.groups.values())
        plan = fairshare.plan_fairly(pending, {f"{s.namespace}/{s.name}": s.members for s in states if s.accepting}, run,
                                     fairshare.Weights(self.config.namespace_weights), releasing)
        metrics.PLANNER.observe(time.perf_counter() - t0)
        self.last_plan = plan
        return plan

    async def _charge_quotas(self, snap: Snapshot, ms: Membership, plan: Plan) -> Plan:
        """A shared group's GPUs are charged to its members' namespaces (operator/quota.py): the new
        tasks their quotas cannot cover wait (QuotaExceeded), the rest is planned again without them."""
        states = self._group_states(snap, ms)
        plan, waiting = await quota.place_within_quota(
            self.client, plan, self._pending(snap, ms), {k: ms.request(k) for k in ms.member_of},
            lambda p: run_planner(p, states, snap.inventory, snap.architectures, snap.planner_config,
                                  reserved_names=snap.reserved_names))
        if waiting:
            plan = dataclasses.replace(plan, unplaceable=(*plan.unplaceable, *waiting))
            self.last_plan = plan
        return plan

    def _group_states(self, snap: Snapshot, ms: Membership) -> list:
        """Each live group as the planner sees it; a failed or refused group takes no new members."""
        states = []
        for gk, g in snap.groups.items():
            if deleting(g):
                continue
            pods = snap.pods_of.get(gk, [])
            accepting = not group_failed(g, pods, self.config.max_group_restarts) and not self.backoff.refused(gk)
            started = group_started(gk[1], [snap.tasks[k] for k in ms.active[gk]], self.reports)
            states.append(group_state(g, [ms.request(k) for k in ms.active[gk]], unbound_pods(g, pods), accepting,
                                      started))
        moving = {k: ms.request(k) for k in self.repacker.moving if k in snap.tasks and ms.placeable(k, snap.tasks[k])}
        return self.repacker.arrivals(states, moving, self._held)

    def _pending(self, snap: Snapshot, ms: Membership) -> list:
        """Placeable tasks in no group, less those a repack pass moves (they join their target)."""
        return [r for r in pending_requests(snap, ms) if r.key not in self.repacker.moving]

    def _repack_settle(self, snap: Snapshot, ms: Membership) -> None:
        """Moves done or void are forgotten; a member that left a group arms the next repack pass;
        a moving task waits while its old group still has pods (the engine checkpoints it on SIGTERM)."""
        live = {k for k, o in snap.tasks.items() if ms.placeable(k, o)}
        targets = {gk[1] for gk, g in snap.groups.items() if not deleting(g)}
        self.repacker.settle(ms.member_of, live, targets)
        if any(len((g.get("spec") or {}).get("tasks") or []) > len(ms.active.get(gk, []))
               for gk, g in snap.groups.items() if not deleting(g)):
            self.repacker.members_left = True
        with_pods = {gk[1] for gk, pods in snap.pods_of.items() if pods}
        self._held = self.repacker.held(lambda name: name in with_pods)

    def _repack(self, snap: Snapshot, ms: Membership, plan: Plan) -> Plan:
        """A repack pass when one is due (operator/repacker.py bounds them); held tasks say why they wait."""
        if self._held:
            plan = dataclasses.replace(plan, unplaceable=(*plan.unplaceable, *self.repacker.unplaceable(self._held)))
        if self.repacker.max_moves <= 0 or not self.repacker.due(placing=bool(plan.placements)):
            return plan
        before = dict(self.repacker.moving)
        plan = self.repacker.run(plan, self._group_states(snap, ms), snap.architectures, snap.planner_config)
        for k, mv in sorted(self.repacker.moving.items()):
            if k not in before:
                log.info("repack: %s moves from group %s to %s through its checkpoint", k, mv.source, mv.target)
        return plan

    async def _apply(self, snap: Snapshot, ms: Membership, plan: Plan, tplan: TransferPlan) -> list:
        """Create, update or delete every planned group; gangs without pods first learn whether all
        their pods fit (by priority, so a high-priority gang is not starved by smaller ones). The
        transfer Jobs the plan misses are created alongside."""
        gplans = planned_groups(plan)
        priority = {gk: max((ms.parsed[k].spec.priority for k in gp.members), default=0) for gk, gp in gplans.items()}
        self.gang_fits = gang_capacity(gplans, snap.groups, snap.pods_of, snap.inventory, priority)
        for gk in [gk for gk in self.gang if gk not in gplans]:
            del self.gang[gk]  # in place: the applier holds the same dict
        jobs = [self._create_job(j) for j in tplan.create]
        for gk, gp in gplans.items():
            jobs.append(self.applier.apply(
                gk, gp, snap.groups.get(gk), [snap.tasks[k] for k in gp.members], [ms.parsed[k] for k in gp.members],
                snap.pods_of.get(gk, []), snap.configmaps.get((gk[0], resources.configmap_name(gk[1]))),
                snap.services.get(gk), snap.basemodels, fits=self.gang_fits.get(gk, (True, ""))))
        return await self._gather(jobs)

    async def _basemodel_status(self, snap: Snapshot, tplan: TransferPlan) -> None:
        """A BaseModel is ready when the planner has size figures for it (and hf/s3 weights are
        staged into the model cache)."""
        jobs = []
        for bname, bm in sorted(snap.basemodels.items()):
            arch = snap.architectures.get(bname)
            want = {"ready": arch is not None,
                    "message": "architecture figures available to the planner" if arch is not None
                    else basemodel_figures(bm)[1]}
            if arch is not None:
                want["architecture"] = arch.model_dump(mode="json", by_alias=True, exclude_none=True)
            if bname in tplan.models:  # hf/s3 weights: ready once staged into the model cache
                want.update(tplan.models[bname])
                want["ready"] = want["ready"] and want["phase"] == "Ready"
            if not subset(want, bm.get("status") or {}):
                jobs.append(self.client.patch(API, "basemodels", None, bname, {"status": want}, subresource="status"))
        await self._gather(jobs)

    async def _task_status(self, snap: Snapshot, ms: Membership, plan: Plan,
                           tplan: TransferPlan) -> dict[tuple[str, str], int]:
        """Recompute every task's status from this pass's outcome and write those that differ;
        returns the tasks per (namespace, phase)."""
        unplaceable = {u.task: u for u in plan.unplaceable}
        final_member = {k: gk for gk, gp in planned_groups(plan).items() for k in gp.members}
        jobs = []
        counts: dict[tuple[str, str], int] = {}
        for k, o in sorted(snap.tasks.items()):
            if deleting(o):
                continue
            view = self._task_view(k, o, ms.parsed[k], final_member.get(k), ms.refused.get(k) or unplaceable.get(k),
                                   snap.pods_of)
            view = dataclasses.replace(view, stages=tuple(tplan.conditions.get(k, ())))
            old = o.get("status") or {}
            new = status.compute_status(old, view, snap.now)
            ns = o["metadata"]["namespace"]
            counts[(ns, new.get("phase", "Pending"))] = counts.get((ns, new.get("phase", "Pending")), 0) + 1
            if status.differs(old, new):
                jobs.append(self._write_status(o, old, new))
        await self._gather(jobs)
        return counts

    async def _create_job(self, job: dict) -> None:
        """A transfer Job (its name is derived: after a restart the existing one is adopted)."""
        try:
            created, _ = await self.client.create_or_adopt("batch/v1", "jobs", job["metadata"]["namespace"], job)
            self.overlay.note("jobs", created)
        except ApiError as exc:
            log.warning("cannot create Job %s/%s: %s", job["metadata"]["namespace"], job["metadata"]["name"], exc.message)

    async def _gather(self, coros) -> list:
        """Run writes concurrently (at most api_concurrency at once); a failed one counts, logs and
        answers False instead of failing the pass."""
        return await asyncio.gather(*(self._guarded(c) for c in coros))

    async def _guarded(self, coro):
        async with self._sem:
            try:
                return await coro
            except Exception:  # noqa: BLE001
                metrics.RECONCILE_ERRORS.inc()
                self.errors += 1
                log.exception("write failed")
                return False

    def _task_view(self, key, obj, parsed, gk, unpl, pods_of) -> status.TaskView:
        """What the status of one task is computed from (operator/status.py)."""
        meta = obj["metadata"]
        gen = meta.get("generation")
        if isinstance(parsed, str):
            return status.TaskView(gen, None, "invalid", message=parsed)
        max_steps = parsed.spec.training.max_steps
        queued = KUEUE_QUEUE_LABEL in (meta.get("labels") or {})
        if parsed.spec.suspend:
            return status.TaskView(gen, max_steps, "suspended", kueue=queued)
        if gk is None:
            if unpl:
                return status.TaskView(gen, max_steps, "unplaceable", reason=unpl.reason, message=unpl.message,
                                       final=getattr(unpl, "final", False))
            return status.TaskView(gen, max_steps, "pending")
        gpods = sorted((p for p in pods_of.get(gk, []) if not p["deleting"]), key=lambda p: p["name"])
        pod_state, pod_msg = self._pod_state(gk, gpods)
        report = self.reports.get(key)
        if report is not None and report.get("_group") != gk[1]:
            report = None
        if report is not None and pod_state in ("restarting", "gang") and report.get("phase") not in status.TERMINAL:
            report = None  # what the lost world said; its tasks resume from checkpoints in the next one
        reach = self.poller.unreachable(gk)
        return status.TaskView(gen, max_steps, "member", group=gk[1], pod_state=pod_state, pod_message=pod_msg,
                               report=report, kueue=queued, unreachable_since=reach.since if reach else None,
                               unreachable_message=reach.error if reach else "",
                               endpoint=serving_endpoint(gk[1], gk[0]))

    def _pod_state(self, gk: GroupKey, gpods: list[dict]) -> tuple[str, str]:
        """(state, message) of a member's group as its tasks show it: the gang first, then the pods."""
        refusal = self.backoff.refused(gk)
        decision = self.gang.get(gk) or gang.Decision(gang.STEADY)
        if decision.action == gang.FAILED:
            return "failed", decision.message
        if decision.reason == "GroupRestarting":
            return "restarting", decision.message
        if decision.reason == "WaitingForGang":
            return "gang", decision.message
        if refusal is not None:
            return "refused", f"the API server refused the group's pod: {refusal.message}"
        if any(p.get("gated") for p in gpods):
            return "admission", self.workload_msgs.get(gk) or kueue.waiting_message(None)
        if gpods and all(p["phase"] == "Running" for p in gpods):
            return "running", ""
        if any(p.get("waiting") for p in gpods):
            p = next(p for p in gpods if p.get("waiting"))
            return "waiting", f"pod {p['name']}: {p['waiting']}"
        if gpods and all(p.get("nodeName") for p in gpods):
            return "scheduled", ", ".join(f"pod {p['name']} bound to {p['nodeName']}" for p in gpods)
        if any(p.get("unschedulable") for p in gpods):
            p = next(p for p in gpods if p.get("unschedulable"))
            return "unschedulable", f"pod {p['name']} cannot be scheduled: {p['unschedulable']}"
        return ("pending", "") if gpods else ("none", "")

    async def _write_status(self, obj: dict, old: dict, new: dict) -> bool:
        m = obj["metadata"]
        patch = {"status": {**{k: None for k in old if k not in new}, **new}}
        try:
            res = await self.client.patch(API, "finetunetasks", m["namespace"], m["name"], patch, subresource="status")
        except ApiError as e:
            if e.status == 404:
                return True  # deleted meanwhile; the next pass no longer sees it
            raise
        self.overlay.note("finetunetasks", res)
        ev = status.transition_event(old, new)
        for e in ([ev] if ev else []) + status.condition_events(old, new):
            await self.events.post(obj, *e)
        if new.get("phase") == "Running" and old.get("phase") != "Running" and m.get("creationTimestamp"):
            try:
                created = datetime.strptime(m["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
                metrics.TIME_TO_RUNNING.observe(max(0.0, (datetime.now(timezone.utc) - created).total_seconds()))
            except ValueError:
                pass
        return True

    # ------------------------------------------------------------------ engine polling

    async def poll_once(self) -> bool:
        """Fetch /v1/status from rank 0 of every group, and why Kueue holds back gated groups; True
        when a task's status should change."""
        node_fake = {n["name"]: n.get("fake", False) for n in self._index(IDX_NODES).values()}
        pods = self._view("pods", IDX_PODS)
        changed = await self.poller.poll(self._view("backbonegroups", IDX_GROUPS), pods, node_fake)
        gated = sorted({(p["namespace"], p["labels"][LABEL_GROUP]) for p in pods.values() if p.get("gated")
                        and (p.get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY and LABEL_GROUP in p["labels"]})
        for gk in gated:
            msg = kueue.waiting_message(await kueue.workload(self.client, *gk))
            if self.workload_msgs.get(gk) != msg:
                self.workload_msgs[gk], changed = msg, True
        for gk in [gk for gk in self.workload_msgs if gk not in gated]:
            del self.workload_msgs[gk]
        return changed


def planned_groups(plan: Plan) -> dict[GroupKey, GroupPlan]:
    return {(gp.namespace, gp.name): gp for gp in plan.groups}


def gang_capacity(gplans: Mapping[GroupKey, GroupPlan], group_objs: Mapping[GroupKey, dict],
                  pods_of: Mapping[GroupKey, list[dict]], inventory, priority: Mapping[GroupKey, int]) -> dict:
    """(fits, why) for every group whose pods are all to be created: free GPUs of its class on
    schedulable nodes, less the GPUs of pods not yet bound, handed out by priority then name."""
    cap = gang.Capacity(inventory)
    product_of = {gk: (gp.gpu_product, gp.gpu_memory_mib) for gk, gp in gplans.items()}
    for gk, g in group_objs.items():
        ann = g["metadata"].get("annotations") or {}
        product_of.setdefault(gk, ((g.get("spec") or {}).get("gpuProduct") or "", int(ann.get(ANN_GPU_MEMORY) or 0)))
    unbound = [p for gp in pods_of.values() for p in gp if not p["deleting"] and not p.get("nodeName")
               and p["phase"] not in ("Succeeded", "Failed") and p.get("gpus")]
    for p in sorted(unbound, key=lambda p: (p["namespace"], p["name"])):
        product, mib = product_of.get((p["namespace"], (p.get("labels") or {}).get(LABEL_GROUP)), ("", 0))
        cap.reserve_unbound(product, mib, p["gpus"])
    out = {}
    waiting = [(gk, gp) for gk, gp in gplans.items()
               if gp.members and not gp.queue and not any(not p["deleting"] for p in pods_of.get(gk, []))]
    slices = _free_slices(inventory, pods_of)
    for gk, gp in sorted(waiting, key=lambda x: (-priority.get(x[0], 0), x[0])):
        if gp.shared_gpu:  # one time-sliced replica on a node of its product
            node = next((n for n, (product, free) in sorted(slices.items()) if product == gp.gpu_product and free > 0), None)
            out[gk] = (True, "") if node else (False, f"waiting for a free shared {gp.gpu_product} GPU slice")
            if node:
                slices[node] = (gp.gpu_product, slices[node][1] - 1)
            continue
        where = cap.place(gp.gpu_product, gp.gpu_memory_mib, gp.pods, gp.gpus_per_pod)
        if where is None:
            out[gk] = (False, cap.why_not(gp.gpu_product, gp.gpu_memory_mib, gp.pods, gp.gpus_per_pod))
        else:
            cap.take(where, gp.gpus_per_pod)
            out[gk] = (True, "")
    return out


def _free_slices(inventory, pods_of: Mapping[GroupKey, list[dict]]) -> dict[str, tuple[str, int]]:
    """node -> (product, free shared GPU slices), less the slices of pods not yet bound."""
    free = {n.name: (n.gpu_product, n.slices_free) for n in inventory if n.gpu_slices > 1}
    pending = sum(p.get("slices", 0) for ps in pods_of.values() for p in ps
                  if not p["deleting"] and not p.get("nodeName") and p["phase"] not in ("Succeeded", "Failed"))
    for name in sorted(free, key=lambda n: -free[n][1]):
        take = min(pending, free[name][1])
        free[name], pending = (free[name][0], free[name][1] - take), pending - take
    return free


def _record_metrics(snap: Snapshot, plan: Plan, counts: dict[tuple[str, str], int]) -> None:
    """Tasks by phase, live groups, their pods' GPUs (requested, bound) against the plan's bounds."""
    metrics.set_task_counts(counts)
    live_groups = [gk for gk, gp in planned_groups(plan).items() if gp.members]
    metrics.GROUPS.set(len(live_groups))
    req = alloc = 0
    for gk in live_groups:
        for p in snap.pods_of.get(gk, []):
            if p["phase"] in ("Succeeded", "Failed") or p["deleting"]:
                continue
            req += p["gpus"]
            alloc += p["gpus"] if p.get("nodeName") else 0
    metrics.GPUS_REQUESTED.set(req)
    metrics.GPUS_ALLOCATED.set(alloc)
    metrics.GPUS_LOWER_BOUND.set(plan.lower_bound_gpus)
    metrics.GPUS_LOWER_BOUND_TENANCY.set(plan.lower_bound_gpus_by_tenancy)
    metrics.PACKING.set(plan.packing_efficiency)
