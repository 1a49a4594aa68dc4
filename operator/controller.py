"""The operator's level-triggered reconciler.

One reconcile pass reads the whole world from kopf's in-memory indices (kept current by watches),
derives every desired object from it, and writes only differences:

1. membership: a BackboneGroup's spec.tasks is the source of truth. Members that were deleted,
   suspended, finished (Succeeded/Failed), re-created under another uid, or listed twice leave.
2. pending tasks (in no group, not suspended, not terminal, valid) go to the pure planner with
   the groups' remaining members and the free GPUs per node.
3. apply: create/patch groups, their ConfigMap (member tasks as the engine reads them), headless
   Service and Pods; delete groups left without members (children first, then the group).
   Creates answer 409 on a deterministic name after a restart: the existing object is adopted.
4. status: every task's status is recomputed (status.compute_status) and patched when it differs;
   an Event is posted per transition.

A second loop polls each running group's engine (/v1/status, operator/poller.py) and feeds the
reports into pass 4. Group writes are in operator/groups.py. Our own writes are kept in an overlay
until the watch shows them, so a pass that runs before the watch caught up neither repeats nor
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
from muxtune.operator import gang, kueue, metrics, policy, resources, status
from muxtune.operator.config import (
    ANN_GPU_MEMORY,
    KUEUE_QUEUE_LABEL,
    LABEL_GROUP,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    SERVING_PORT,
    OperatorConfig,
)
from muxtune.operator.groups import GroupsMixin, PodBackoff, subset
from muxtune.operator.keys import GroupKeys
from muxtune.operator.kube import ApiError, KubeClient
from muxtune.operator.planner import Plan, plan as run_planner
from muxtune.operator.poller import EnginePoller
from muxtune.operator.transfer_plan import plan_transfers
from muxtune.operator.transfers import LABEL_TRANSFER
from muxtune.operator.world import (
    basemodel_architecture,
    group_state,
    node_inventory,
    parse_task,
    task_request,
)

log = logging.getLogger("muxtune.operator")
API = f"{GROUP}/{VERSION}"
OVERLAY_TTL = 120.0
IDX_TASKS, IDX_GROUPS, IDX_MODELS = "muxtune_tasks", "muxtune_groups", "muxtune_basemodels"
IDX_NODES, IDX_PODS, IDX_CMS, IDX_SVCS = "muxtune_nodes", "muxtune_pods", "muxtune_configmaps", "muxtune_services"
IDX_NAMESPACES = "muxtune_namespaces"
IDX_JOBS = "muxtune_jobs"


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rv(obj: Mapping | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or -1)
    except ValueError:
        return -1


def _key(obj: Mapping) -> tuple[str, str]:
    m = obj["metadata"]
    return (m.get("namespace") or "", m["name"])


class Controller(GroupsMixin):
    def __init__(self, config: OperatorConfig, client: KubeClient, keys: GroupKeys | None = None, elector=None):
        self.config = config
        self.client = client
        client.writable_namespaces = config.watched
        self.keys = keys or GroupKeys.from_file(config.signing_key_file)
        self.poller = EnginePoller(config, self.keys.key)
        self.backoff = PodBackoff(config.pod_backoff_base, config.pod_backoff_cap)
        self.elector = elector
        self._sa_ready: set[tuple[str, str]] = set()
        self.indices: Mapping[str, Any] | None = None
        self.ready = False
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()
        self._overlay: dict[tuple[str, str, str], tuple[int, dict | None, float]] = {}
        self._parse_cache: dict[tuple[str, str], Any] = {}
        self.last_plan: Plan | None = None
        self.gang: dict[tuple[str, str], gang.Decision] = {}  # this pass's decision per group
        self.gang_fits: dict[tuple[str, str], tuple[bool, str]] = {}  # whether a group's pods all fit now
        self.workload_msgs: dict[tuple[str, str], str] = {}  # why Kueue holds a group back
        self.passes = 0
        self.errors = 0
        self._tasks: list[asyncio.Task] = []
        self._instance = socket.gethostname()
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
        self._overlay.pop((plural, namespace or "", name), None)

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

    def _note(self, plural: str, obj: dict | None, key: tuple[str, str] | None = None) -> None:
        """Remember our own write (None: deleted) until the watch shows it."""
        if obj is not None and obj.get("kind") == "Status":
            obj = None
        k = key or _key(obj)  # type: ignore[arg-type]
        self._overlay[(plural, k[0], k[1])] = (_rv(obj) if obj else -1, obj, time.monotonic())

    def _view(self, plural: str, index_name: str) -> dict[tuple[str, str], dict]:
        objs = {(k if isinstance(k, tuple) else ("", k)): v for k, v in self._index(index_name).items()}
        now = time.monotonic()
        for (pl, ns, name), (rv, obj, t) in list(self._overlay.items()):
            if pl != plural:
                continue
            cur = objs.get((ns, name))
            if now - t > OVERLAY_TTL:
                del self._overlay[(pl, ns, name)]
                continue
            if cur is None and plural == "finetunetasks":
                del self._overlay[(pl, ns, name)]  # we only patch tasks: gone from the index means deleted
                continue
            if obj is None:  # our delete
                if cur is None:
                    del self._overlay[(pl, ns, name)]
                else:
                    objs.pop((ns, name))
                continue
            if cur is not None and _rv(cur) >= rv:
                del self._overlay[(pl, ns, name)]
                continue
            objs[(ns, name)] = obj
        return objs

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
        cfg = self.config
        now = utcnow()
        tasks = self._view("finetunetasks", IDX_TASKS)
        groups = self._view("backbonegroups", IDX_GROUPS)
        pods = self._view("pods", IDX_PODS)
        cms = self._view("configmaps", IDX_CMS)
        svcs = self._view("services", IDX_SVCS)
        nodes = self._index(IDX_NODES)
        bms = self._index(IDX_MODELS)
        ns_labels = {(k if isinstance(k, str) else k[1]): v for k, v in self._index(IDX_NAMESPACES).items()}
        watched = cfg.watched

        by_key = {f"{ns}/{name}": obj for (ns, name), obj in tasks.items() if watched is None or ns in watched}
        self.poller.forget(set(by_key), set(groups))
        parsed = {k: self._parsed(o) for k, o in by_key.items()}
        bm_by_name = {(n if isinstance(n, str) else n[1]): bm for n, bm in bms.items()}
        pcfg = cfg.planner_config()
        refused: dict[str, policy.Refusal] = {}
        for k, p in parsed.items():
            if not isinstance(p, str):
                r = policy.refusal(task_request(p, ns_labels.get(p.metadata.namespace or "default")), bm_by_name,
                                   ns_labels, pcfg)
                if r is not None:
                    refused[k] = r

        # remote data: staging Jobs before placement, export Jobs after Succeeded, model caches
        tplan = plan_transfers({k: (o, parsed[k]) for k, o in by_key.items()}, bm_by_name,
                               self._view("jobs", IDX_JOBS), self._transfer_pods(), cfg)
        for k, r in tplan.holds.items():
            refused.setdefault(k, r)
        await self._gather([self._create_job(j) for j in tplan.create])

        def terminal(o: dict) -> bool:
            return ((o.get("status") or {}).get("phase")) in status.TERMINAL

        def deleting(o: dict) -> bool:
            return bool(o["metadata"].get("deletionTimestamp"))

        def suspended(k: str) -> bool:
            p = parsed[k]
            return not isinstance(p, str) and p.spec.suspend

        # 1. membership
        member_of: dict[str, tuple[str, str]] = {}
        active: dict[tuple[str, str], list[str]] = {}
        group_objs = {gk: g for gk, g in sorted(groups.items(), key=lambda kv: kv[0][1])}
        for gk, g in group_objs.items():
            keep = []
            if deleting(g):
                continue
            for m in (g.get("spec") or {}).get("tasks") or []:
                k = f"{m['namespace']}/{m['name']}"
                o = by_key.get(k)
                if o is None or (m.get("uid") and o["metadata"].get("uid") != m["uid"]) or deleting(o):
                    continue
                if isinstance(parsed[k], str) or suspended(k) or terminal(o) or k in member_of or k in refused:
                    continue
                member_of[k] = gk
                keep.append(k)
            active[gk] = keep

        # 2. pods per group, GPU inventory
        pods_of: dict[tuple[str, str], list[dict]] = {}
        for p in pods.values():
            g = (p.get("labels") or {}).get(LABEL_GROUP)
            if g and (p.get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY:
                pods_of.setdefault((p["namespace"], g), []).append(p)
        inventory = node_inventory(nodes.values(), pods.values())
        node_fake = {n["name"]: n.get("fake", False) for n in nodes.values()}

        def group_failed(gk) -> bool:  # lost pods restart the group, until the restart limit
            g = group_objs[gk]
            return gang.restarts_of(g)[0] >= cfg.max_group_restarts and \
                gang.lost_pod(pods_of.get(gk, []), int(((g.get("spec") or {}).get("parallelism") or {}).get("dp", 1)),
                              False) is not None

        def request(k: str):
            return task_request(parsed[k], ns_labels.get(k.split("/", 1)[0]))

        states = []
        for gk, g in group_objs.items():
            if deleting(g):
                continue
            dp = int(((g.get("spec") or {}).get("parallelism") or {}).get("dp", 1))
            live = [p for p in pods_of.get(gk, []) if not p["deleting"] and p["phase"] not in ("Succeeded", "Failed")]
            unbound = sum(1 for p in live if not p.get("nodeName")) + max(0, dp - len(live))
            reqs = [request(k) for k in active[gk]]
            states.append(group_state(g, reqs, unbound, accepting=not group_failed(gk) and not self.backoff.refused(gk)))

        # 3. plan
        pending = []
        for k, o in sorted(by_key.items()):
            if k in member_of or deleting(o) or terminal(o) or isinstance(parsed[k], str) or suspended(k) or k in refused:
                continue
            pending.append(request(k))
        basemodels = {name if isinstance(name, str) else name[1]: basemodel_architecture(bm) for name, bm in bms.items()}
        t0 = time.perf_counter()
        # names still in use by terminating groups (ours or as the watch last saw them)
        reserved = {k[1] for k in self._index(IDX_GROUPS)} | {name for (pl, _, name) in self._overlay if pl == "backbonegroups"}
        reserved |= {gk[1] for gk, g in group_objs.items() if deleting(g)}
        plan = run_planner(pending, states, inventory, basemodels, pcfg, reserved_names=reserved)
        metrics.PLANNER.observe(time.perf_counter() - t0)
        self.last_plan = plan
        unplaceable = {u.task: u for u in plan.unplaceable}
        gplans = {(gp.namespace, gp.name): gp for gp in plan.groups}

        # 4. apply groups (gangs without pods first learn whether all their pods fit)
        priority = {gk: max((parsed[k].spec.priority for k in gp.members), default=0) for gk, gp in gplans.items()}
        self.gang_fits = self._gang_capacity(gplans, group_objs, pods_of, inventory, priority)
        self.gang = {gk: d for gk, d in self.gang.items() if gk in gplans}
        jobs = []
        for gk, gp in gplans.items():
            members = [by_key[k] for k in gp.members]
            jobs.append(self._apply_group(gk, gp, group_objs.get(gk), members, [parsed[k] for k in gp.members],
                                          pods_of.get(gk, []), cms.get((gk[0], resources.configmap_name(gk[1]))),
                                          svcs.get(gk), bm_by_name))
        results = await self._gather(jobs)
        final_member: dict[str, tuple[str, str]] = {}
        for gk, gp in gplans.items():
            for k in gp.members:
                final_member[k] = gk

        # BaseModel status: ready when the planner has size figures for it
        bjobs = []
        for bname, bm in sorted(bm_by_name.items()):
            arch = basemodels.get(bname)
            want = {"ready": arch is not None,
                    "message": "architecture figures available to the planner" if arch is not None
                    else "no architecture figures: set spec.architecture (parameters, layers, hiddenSize)"}
            if arch is not None:
                want["architecture"] = arch.model_dump(mode="json", by_alias=True, exclude_none=True)
            if bname in tplan.models:  # hf/s3 weights: ready once staged into the model cache
                want.update(tplan.models[bname])
                want["ready"] = want["ready"] and want["phase"] == "Ready"
            if not subset(want, bm.get("status") or {}):
                bjobs.append(self.client.patch(API, "basemodels", None, bname, {"status": want}, subresource="status"))
        await self._gather(bjobs)

        # 5. task statuses
        sjobs = []
        counts: dict[tuple[str, str], int] = {}
        for k, o in sorted(by_key.items()):
            if deleting(o):
                continue
            view = self._task_view(k, o, parsed[k], final_member.get(k), refused.get(k) or unplaceable.get(k), pods_of)
            view = dataclasses.replace(view, stages=tuple(tplan.conditions.get(k, ())))
            old = o.get("status") or {}
            new = status.compute_status(old, view, now)
            ns = o["metadata"]["namespace"]
            counts[(ns, new.get("phase", "Pending"))] = counts.get((ns, new.get("phase", "Pending")), 0) + 1
            if status.differs(old, new):
                sjobs.append(self._write_status(o, old, new))
        await self._gather(sjobs)

        # 6. metrics
        metrics.set_task_counts(counts)
        live_groups = [gk for gk, gp in gplans.items() if gp.members]
        metrics.GROUPS.set(len(live_groups))
        req = alloc = 0
        for gk in live_groups:
            for p in pods_of.get(gk, []):
                if p["phase"] in ("Succeeded", "Failed") or p["deleting"]:
                    continue
                req += p["gpus"]
                alloc += p["gpus"] if p.get("nodeName") else 0
        metrics.GPUS_REQUESTED.set(req)
        metrics.GPUS_ALLOCATED.set(alloc)
        metrics.GPUS_LOWER_BOUND.set(plan.lower_bound_gpus)
        metrics.GPUS_LOWER_BOUND_TENANCY.set(plan.lower_bound_gpus_by_tenancy)
        metrics.PACKING.set(plan.packing_efficiency)
        if any(r is False for r in results):
            self._kick.set()  # something failed: try again after the debounce

    def _gang_capacity(self, gplans, group_objs, pods_of, inventory, priority) -> dict:
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
        for gk, gp in sorted(waiting, key=lambda x: (-priority.get(x[0], 0), x[0])):
            where = cap.place(gp.gpu_product, gp.gpu_memory_mib, gp.pods, gp.gpus_per_pod)
            if where is None:
                out[gk] = (False, cap.why_not(gp.gpu_product, gp.gpu_memory_mib, gp.pods, gp.gpus_per_pod))
            else:
                cap.take(where, gp.gpus_per_pod)
                out[gk] = (True, "")
        return out

    def _transfer_pods(self) -> dict[tuple[str, str], list[dict]]:
        """The transfer Jobs' pods by (namespace, Job name), for their termination messages."""
        out: dict[tuple[str, str], list[dict]] = {}
        for p in self._view("pods", IDX_PODS).values():
            labels = p.get("labels") or {}
            if LABEL_TRANSFER in labels and labels.get("job-name"):
                out.setdefault((p["namespace"], labels["job-name"]), []).append(p)
        return out

    async def _create_job(self, job: dict) -> None:
        """A transfer Job (its name is derived: after a restart the existing one is adopted)."""
        try:
            created, _ = await self.client.create_or_adopt("batch/v1", "jobs", job["metadata"]["namespace"], job)
            self._note("jobs", created)
        except ApiError as exc:
            log.warning("cannot create Job %s/%s: %s", job["metadata"]["namespace"], job["metadata"]["name"], exc.message)

    async def _gather(self, coros) -> list:
        async def run(c):
            async with self._sem:
                try:
                    return await c
                except Exception:  # noqa: BLE001
                    metrics.RECONCILE_ERRORS.inc()
                    self.errors += 1
                    log.exception("write failed")
                    return False
        return await asyncio.gather(*(run(c) for c in coros))

    def _task_view(self, key, obj, parsed, gk, unpl, pods_of) -> status.TaskView:
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
        pod_state, pod_msg = "none", ""
        refusal = self.backoff.refused(gk)
        decision = self.gang.get(gk) or gang.Decision(gang.STEADY)
        if decision.action == gang.FAILED:
            pod_state, pod_msg = "failed", decision.message
        elif decision.reason == "GroupRestarting":
            pod_state, pod_msg = "restarting", decision.message
        elif decision.reason == "WaitingForGang":
            pod_state, pod_msg = "gang", decision.message
        elif refusal is not None:
            pod_state, pod_msg = "refused", f"the API server refused the group's pod: {refusal.message}"
        elif any(p.get("gated") for p in gpods):
            pod_state, pod_msg = "admission", self.workload_msgs.get(gk) or kueue.waiting_message(None)
        elif gpods and all(p["phase"] == "Running" for p in gpods):
            pod_state = "running"
        elif any(p.get("waiting") for p in gpods):
            p = next(p for p in gpods if p.get("waiting"))
            pod_state, pod_msg = "waiting", f"pod {p['name']}: {p['waiting']}"
        elif gpods and all(p.get("nodeName") for p in gpods):
            pod_state, pod_msg = "scheduled", ", ".join(f"pod {p['name']} bound to {p['nodeName']}" for p in gpods)
        elif any(p.get("unschedulable") for p in gpods):
            p = next(p for p in gpods if p.get("unschedulable"))
            pod_state, pod_msg = "unschedulable", f"pod {p['name']} cannot be scheduled: {p['unschedulable']}"
        elif gpods:
            pod_state = "pending"
        report = self.reports.get(key)
        if report is not None and report.get("_group") != gk[1]:
            report = None
        if report is not None and pod_state in ("restarting", "gang") and report.get("phase") not in status.TERMINAL:
            report = None  # what the lost world said; its tasks resume from checkpoints in the next one
        reach = self.poller.unreachable(gk)
        return status.TaskView(gen, max_steps, "member", group=gk[1], pod_state=pod_state, pod_message=pod_msg,
                               report=report, kueue=queued, unreachable_since=reach.since if reach else None,
                               unreachable_message=reach.error if reach else "",
                               endpoint=f"http://{gk[1]}.{gk[0]}.svc:{SERVING_PORT}/v1")

    async def _write_status(self, obj: dict, old: dict, new: dict) -> bool:
        m = obj["metadata"]
        patch = {"status": {**{k: None for k in old if k not in new}, **new}}
        try:
            res = await self.client.patch(API, "finetunetasks", m["namespace"], m["name"], patch, subresource="status")
        except ApiError as e:
            if e.status == 404:
                return True  # deleted meanwhile; the next pass no longer sees it
            raise
        self._note("finetunetasks", res)
        ev = status.transition_event(old, new)
        for e in ([ev] if ev else []) + status.condition_events(old, new):
            await self.event(obj, *e)
        if new.get("phase") == "Running" and old.get("phase") != "Running" and m.get("creationTimestamp"):
            try:
                created = datetime.strptime(m["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
                metrics.TIME_TO_RUNNING.observe(max(0.0, (datetime.now(timezone.utc) - created).total_seconds()))
            except ValueError:
                pass
        return True

    async def event(self, obj: dict, type_: str, reason: str, message: str) -> None:
        m = obj["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{m['name']}.", "namespace": m.get("namespace") or "default"},
            "involvedObject": {"apiVersion": obj.get("apiVersion", API), "kind": obj.get("kind", "FineTuneTask"),
                               "name": m["name"], "namespace": m.get("namespace"), "uid": m.get("uid")},
            "reason": reason,
            "message": (message or reason)[:1024],
            "type": type_,
            "source": {"component": MANAGED_BY},
            "reportingComponent": f"muxtune.io/{MANAGED_BY}",
            "reportingInstance": self._instance[:128],
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
        }
        try:
            await self.client.create("v1", "events", m.get("namespace") or "default", body)
        except Exception as e:  # noqa: BLE001 - events are best effort
            log.warning("posting event %s for %s failed: %s", reason, m["name"], e)

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
