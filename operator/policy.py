"""Which tasks the operator refuses to place, and why: pure functions of the task, the BaseModels
and the namespaces' labels.

* A directory ``baseModel`` (``/path``, ``./path``) means a path on the machine of a local run; in
  a cluster it names nothing the operator could mount (and a host path of the tenant's choosing
  would reach any node file), so such a task fails with ``UnsupportedBaseModel``.
* ``model:NAME`` is placed only for namespaces the BaseModel admits (``spec.allowedNamespaces``,
  ``"*"`` for all, or ``spec.namespaceSelector``); others wait with ``ModelNotAllowed``: the
  weights may be another team's.
* A BaseModel whose claim sits in one namespace (``source.pvc.namespace``) can be mounted only by
  pods of that namespace; a task whose group would live elsewhere waits with ``ModelNotMountable``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from muxtune.operator.planner import SHARED, PlannerConfig, TaskRequest, tenancy_for


@dataclass(frozen=True)
class Refusal:
    reason: str  # CamelCase condition reason
    message: str
    final: bool  # the spec can never be placed (what it names is immutable): the task fails


def selector_matches(selector: Mapping | None, labels: Mapping[str, str] | None) -> bool:
    """A Kubernetes LabelSelector (matchLabels, matchExpressions) against labels; empty/None: no match
    (an empty selector admitting every namespace would be too easy to write by accident)."""
    if not selector or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        return False
    labels = labels or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


def namespace_allowed(basemodel: Mapping, namespace: str, namespace_labels: Mapping[str, str] | None) -> bool:
    spec = basemodel.get("spec") or {}
    allowed = spec.get("allowedNamespaces") or []
    return "*" in allowed or namespace in allowed or selector_matches(spec.get("namespaceSelector"), namespace_labels)


def group_namespace(req: TaskRequest, config: PlannerConfig) -> str:
    """Where the task's group would live: its own namespace, or the shared one."""
    t = tenancy_for(req, config)
    return config.shared_namespace if t is SHARED else t


def refusal(req: TaskRequest, basemodels: Mapping[str, Mapping], namespace_labels: Mapping[str, Mapping[str, str]],
            config: PlannerConfig) -> Refusal | None:
    bm_ref = req.base_model
    if bm_ref.startswith(("/", "./", "../")):
        return Refusal("UnsupportedBaseModel",
                       f"baseModel {bm_ref!r} is a local directory, which only `muxtune run` can use; in a cluster "
                       "create a BaseModel (source.pvc or source.hostPath) and set baseModel: model:NAME", True)
    if bm_ref.startswith(("hf://", "s3://")):
        return Refusal("UnsupportedBaseModel",
                       f"baseModel {bm_ref!r} is fetched by `muxtune run` only; in a cluster create a BaseModel "
                       "(source.hf or source.s3: staged once into the model cache) and set baseModel: model:NAME", True)
    if not bm_ref.startswith("model:"):
        return None
    name = bm_ref.split(":", 1)[1]
    bm = basemodels.get(name)
    if bm is None:
        return None  # the planner says ModelUnknown; the task places once the BaseModel exists
    if not namespace_allowed(bm, req.namespace, namespace_labels.get(req.namespace)):
        return Refusal("ModelNotAllowed",
                       f"BaseModel {name!r} does not admit namespace {req.namespace!r}: a cluster admin must list it "
                       "in the BaseModel's spec.allowedNamespaces or match it with spec.namespaceSelector", False)
    pvc_ns = (((bm.get("spec") or {}).get("source") or {}).get("pvc") or {}).get("namespace")
    if pvc_ns and pvc_ns != group_namespace(req, config):
        return Refusal("ModelNotMountable",
                       f"BaseModel {name!r} keeps its weights in a claim of namespace {pvc_ns!r}; pods of namespace "
                       f"{group_namespace(req, config)!r}, where this task's group would run, cannot mount it", False)
    return None
