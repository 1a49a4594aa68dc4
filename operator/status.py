"""FineTuneTask.status from what the operator sees: pure (the caller passes the time).

Phases: Pending (not placed: waiting or unschedulable), Placed (member of a group whose engine does
not yet train it), Running, Succeeded, Failed (terminal: kept as they are), Suspended
(spec.suspend; for Kueue, which admits by flipping it).
Conditions: Placed, Running, EngineReachable (once the engine was polled), and Complete / Failed
once terminal; lastTransitionTime is kept while a condition's status does not change. What keeps a
placed task from running reaches its Running condition and message: a refused pod creation (quota,
Pod Security: the API server's message), an unschedulable pod (the scheduler's message: taints, a
missing PVC, ...), a container waiting (image pull, config errors), and a group's gang state: its pods
wait to fit all at once (WaitingForGang), wait for Kueue to admit their Workload (WaitingForAdmission),
or the whole group restarts from checkpoints after a lost pod (GroupRestarting).
"""
from __future__ import annotations

from dataclasses import dataclass

TERMINAL = ("Succeeded", "Failed")
EXPORT_FAILED = "ExportFailed"  # an Exported=False stage that fails a Succeeded task (operator/transfer_plan.py)
GANG_STATES = {"gang": "WaitingForGang", "admission": "WaitingForAdmission", "restarting": "GroupRestarting"}
ENGINE_PHASES = ("Pending", "Running", "Succeeded", "Failed")


@dataclass(frozen=True)
class TaskView:
    """What the operator knows about one task in this pass."""

    generation: int | None
    max_steps: int | None
    situation: str  # member | pending | unplaceable | suspended | invalid
    group: str | None = None
    reason: str = ""  # unplaceable / pending reason
    message: str = ""
    # none | refused | pending | unschedulable | scheduled | waiting | running | failed | gang | admission | restarting
    pod_state: str = "none"
    pod_message: str = ""
    report: dict | None = None  # the engine's /v1/status entry for the task
    kueue: bool = False
    unreachable_since: str | None = None  # the engine has not answered polls since then
    unreachable_message: str = ""
    final: bool = False  # unplaceable for good (the spec names something the operator never places)
    stages: tuple = ()  # DataStaged / Exported conditions from the transfer Jobs (operator/transfer_plan.py)
    endpoint: str | None = None  # the group's OpenAI API base URL (members of a group that serves)


def _cond(type_: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def merge_conditions(old: list[dict] | None, new: list[dict], now: str, generation: int | None) -> list[dict]:
    by_type = {c.get("type"): c for c in (old or [])}
    out = []
    for c in new:
        prev = by_type.get(c["type"])
        ltt = prev.get("lastTransitionTime") if prev and prev.get("status") == c["status"] else None
        item = dict(c, lastTransitionTime=ltt or c.get("lastTransitionTime") or now)
        if generation is not None:
            item["observedGeneration"] = generation
        out.append(item)
    return out


def _progress(step: int | None, total: int | None) -> str | None:
    if total:
        return f"{step or 0}/{total}"
    return None


def compute_status(old: dict | None, view: TaskView, now: str) -> dict:
    """The status the task should have; equal to ``old`` when nothing changed."""
    old = dict(old or {})
    if old.get("phase") in TERMINAL:  # terminal phases are final; only a stage after them (export) is recorded
        return _with_stages(old, view, now)
    st = _carried(old, view)
    if view.situation == "invalid":
        conds = _failed_for_good(st, "InvalidSpec", view.message, now)
    elif view.situation == "suspended":
        conds = _suspended(st, view)
    elif view.situation == "unplaceable" and view.final:
        conds = _failed_for_good(st, view.reason, view.message, now)
    elif view.situation in ("pending", "unplaceable"):
        conds = _pending(st, view)
    else:
        conds = _member(st, view, now)
    st["progress"] = _progress(st.get("step"), st.get("totalSteps"))
    st["conditions"] = merge_conditions(old.get("conditions"), [*conds, *view.stages], now, view.generation)
    return {k: v for k, v in st.items() if v is not None}


def _carried(old: dict, view: TaskView) -> dict:
    """What survives from the previous status until something newer replaces it."""
    st: dict = {
        "step": old.get("step", 0),
        "totalSteps": old.get("totalSteps") or view.max_steps,
        "loss": old.get("loss"),
        "evalLoss": old.get("evalLoss"),
        "tokensPerSecond": old.get("tokensPerSecond"),
        "checkpoint": old.get("checkpoint"),
        "startTime": old.get("startTime"),
        "completionTime": old.get("completionTime"),
        "group": None,
        "message": None,
    }
    if view.generation is not None:
        st["observedGeneration"] = view.generation
    return st


def _failed_for_good(st: dict, reason: str, message: str, now: str) -> list[dict]:
    """An invalid spec, or one naming what the operator never places: Failed, never retried."""
    st["phase"] = "Failed"
    st["message"] = message
    st["completionTime"] = now
    return [_cond("Placed", "False", reason, message), _cond("Running", "False", reason),
            _cond("Failed", "True", reason, message)]


def _suspended(st: dict, view: TaskView) -> list[dict]:
    st["phase"] = "Suspended"
    reason = "WaitingForAdmission" if view.kueue else "Suspended"
    st["message"] = ("suspended: waiting for Kueue to admit it (spec.suspend)" if view.kueue
                     else "spec.suspend is true; the checkpoint is kept")
    st["tokensPerSecond"] = None
    return [_cond("Placed", "False", reason, st["message"]), _cond("Running", "False", reason)]


def _pending(st: dict, view: TaskView) -> list[dict]:
    st["phase"] = "Pending"
    reason = view.reason or "Queued"
    st["message"] = view.message or "waiting for the planner"
    st["tokensPerSecond"] = None
    return [_cond("Placed", "False", reason, st["message"]), _cond("Running", "False", "NotPlaced")]


def _member(st: dict, view: TaskView, now: str) -> list[dict]:
    """A group member: the engine's report decides the phase; before it trains, the pods say why not."""
    st["group"] = view.group
    placed = _cond("Placed", "True", "Packed", f"member of BackboneGroup {view.group}")
    rep = view.report
    if rep:
        _take_report(st, rep)
    if rep and rep.get("servedModel") and view.endpoint:  # the engine answers for this adapter
        st["endpoint"] = view.endpoint
    ephase = (rep or {}).get("phase")
    if ephase == "Succeeded":
        conds = [placed, *_succeeded(st, rep, now)]
    elif ephase == "Failed" or view.pod_state == "failed":
        conds = [placed, *_failed(st, view, ephase, now)]
    elif ephase == "Running":
        st["phase"] = "Running"
        st["startTime"] = st["startTime"] or now
        conds = [placed, _cond("Running", "True", "EngineRunning", f"step {st['step']}")]
    else:
        st["phase"] = "Placed"
        reason, st["message"] = _not_running_yet(view, ephase)
        conds = [placed, _cond("Running", "False", reason, st["message"])]
    return conds + _reachability(st, view, rep)


# Significant digits kept of the engine's floats: what kubectl get's LOSS and TOKENS/S columns show
# (a number column prints every digit it is given: 4.552380879720052); /v1/status keeps them all.
SHOWN_DIGITS = {"loss": 4, "evalLoss": 4, "tokensPerSecond": 4}


def _significant(value, digits: int):
    return None if value is None else float(f"{float(value):.{digits}g}")


def _take_report(st: dict, rep: dict) -> None:
    st["step"] = int(rep.get("step") or 0)
    st["totalSteps"] = rep.get("totalSteps") or st["totalSteps"]
    for k in ("loss", "evalLoss", "tokensPerSecond", "checkpoint"):
        if k in rep:
            st[k] = rep.get(k)
    for k, digits in SHOWN_DIGITS.items():
        st[k] = _significant(st.get(k), digits)
    if rep.get("message"):
        st["message"] = rep["message"]


def _succeeded(st: dict, rep: dict, now: str) -> list[dict]:
    st["phase"] = "Succeeded"
    st["completionTime"] = now
    # a short task can finish between two polls, never seen Running: it ran by now at the latest
    st["startTime"] = st["startTime"] or now
    st["tokensPerSecond"] = _significant(rep.get("tokensPerSecond"), SHOWN_DIGITS["tokensPerSecond"])
    st["message"] = st["message"] or "training finished; adapter written"
    return [_cond("Running", "False", "Completed"), _cond("Complete", "True", "Succeeded", st["message"])]


def _failed(st: dict, view: TaskView, ephase: str | None, now: str) -> list[dict]:
    st["phase"] = "Failed"
    st["completionTime"] = now
    reason = "EngineFailed" if ephase == "Failed" else "PodFailed"
    st["message"] = (view.report or {}).get("message") or view.pod_message or "the engine reported a failure"
    return [_cond("Running", "False", reason, st["message"]), _cond("Failed", "True", reason, st["message"])]


def _not_running_yet(view: TaskView, ephase: str | None) -> tuple[str, str]:
    """(reason, message) of a placed task's Running=False: the gang, the engine, else its pods."""
    if view.pod_state in GANG_STATES:
        return GANG_STATES[view.pod_state], view.pod_message
    if ephase == "Pending":
        return "EngineQueued", "the engine has the task and has not started it yet"
    if view.pod_state == "refused":
        return "PodCreationRefused", view.pod_message
    if view.pod_state == "unschedulable":
        return "PodUnschedulable", view.pod_message
    if view.pod_state == "waiting":
        return "ContainerWaiting", view.pod_message
    if view.pod_state == "running":
        return "EngineStarting", view.pod_message or "waiting for the engine's /v1/status"
    if view.pod_state == "scheduled":
        return "PodStarting", view.pod_message or "the pod is bound to a node and starting"
    return "PodPending", view.pod_message or "waiting for the scheduler to bind the group's pod"


def _reachability(st: dict, view: TaskView, rep: dict | None) -> list[dict]:
    """EngineReachable, only while the task runs or waits to, and only once the engine was polled."""
    if st["phase"] in ("Running", "Placed") and view.unreachable_since:
        msg = f"the engine has not answered since {view.unreachable_since}: {view.unreachable_message}"
        st["message"] = msg
        return [dict(_cond("EngineReachable", "False", "EngineUnreachable", msg),
                     lastTransitionTime=view.unreachable_since)]
    if st["phase"] in ("Running", "Placed") and rep:
        return [_cond("EngineReachable", "True", "EngineReporting", "the engine answers status polls")]
    return []


def _with_stages(old: dict, view: TaskView, now: str) -> dict:
    """old with the view's stage conditions merged in (replacing conditions of the same type)."""
    if not view.stages:
        return old
    stages = list(view.stages)
    new = dict(old)
    failed = next((c for c in stages if c.get("reason") == EXPORT_FAILED), None)
    if failed and old.get("phase") == "Succeeded":  # as `muxtune run` fails it: the upload is part of the task
        new.update(phase="Failed", completionTime=now,
                   message=f"{failed['message']} (the adapter is kept in the output directory)")
        stages += [_cond("Complete", "False", EXPORT_FAILED, new["message"]),
                   _cond("Failed", "True", EXPORT_FAILED, new["message"])]
    types = {c["type"] for c in stages}
    kept = [c for c in old.get("conditions") or [] if c.get("type") not in types]
    merged = merge_conditions(old.get("conditions"), stages, now, view.generation)
    return {**new, "conditions": kept + merged}


def differs(old: dict | None, new: dict) -> bool:
    return _strip(old or {}) != _strip(new)


def _strip(st: dict) -> dict:
    return {k: v for k, v in st.items() if v is not None}


def transition_event(old: dict | None, new: dict) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Kubernetes Event for a phase change, or None."""
    op, np_ = (old or {}).get("phase"), new.get("phase")
    if op == np_:
        if np_ == "Pending":
            oc = _placed_reason(old)
            nc = _placed_reason(new)
            if oc != nc and nc not in ("Queued", None):
                return ("Warning", nc, new.get("message", ""))
        return None
    msg = new.get("message") or ""
    if np_ == "Placed":
        return ("Normal", "Placed", f"placed in BackboneGroup {new.get('group')}")
    if np_ == "Running":
        return ("Normal", "Running", f"training in BackboneGroup {new.get('group')}")
    if np_ == "Succeeded":
        return ("Normal", "Succeeded", msg or "training finished")
    if np_ == "Failed":
        return ("Warning", "Failed", msg)
    if np_ == "Suspended":
        return ("Normal", "Suspended", msg)
    if np_ == "Pending":
        r = _placed_reason(new)
        if r and r != "Queued":
            return ("Warning", r, msg)
        return ("Normal", "Pending", msg) if op else None
    return None


def condition_events(old: dict | None, new: dict) -> list[tuple[str, str, str]]:
    """Events for condition changes that leave the phase as it is (an engine lost or back,
    a pod refused or unschedulable)."""
    def by_type(st):
        return {c.get("type"): c for c in (st or {}).get("conditions") or []}
    o, n = by_type(old), by_type(new)
    out = []
    er_o, er_n = o.get("EngineReachable", {}), n.get("EngineReachable")
    if er_n and er_n.get("status") != er_o.get("status"):
        if er_n["status"] == "False":
            out.append(("Warning", "EngineUnreachable", er_n.get("message", "")))
        elif er_o:
            out.append(("Normal", "EngineReachable", "the engine answers status polls again"))
    run_o, run_n = o.get("Running", {}), n.get("Running", {})
    if (old or {}).get("phase") == new.get("phase") == "Placed" and run_n.get("reason") != run_o.get("reason") \
            and run_n.get("reason") in ("PodUnschedulable", "ContainerWaiting", "WaitingForGang", "GroupRestarting"):
        out.append(("Warning", run_n["reason"], run_n.get("message", "")))
    return out


def _placed_reason(st: dict | None) -> str | None:
    for c in (st or {}).get("conditions") or []:
        if c.get("type") == "Placed":
            return c.get("reason")
    return None
