"""What a workload needs to be gang-admitted by Kueue: queue objects and the pod-group metadata.

Kueue's plain-pod group integration (https://kueue.sigs.k8s.io/docs/tasks/run/plain_pods/) admits a
group of pods as one Workload, all or nothing:

- every pod of the group carries the label ``kueue.x-k8s.io/queue-name: <LocalQueue>``, the label
  ``kueue.x-k8s.io/pod-group-name: <group>`` and the annotation
  ``kueue.x-k8s.io/pod-group-total-count: "<n>"``, identical on all of them (:func:`pod_group_metadata`);
- Kueue's webhook gates each pod at creation (scheduling gate ``kueue.x-k8s.io/admission``, label
  ``kueue.x-k8s.io/managed: "true"``, a finalizer); the Workload, named after the group, is made only
  once ``n`` pods exist; when the ClusterQueue has quota for all of them Kueue removes every pod's
  gate and the scheduler places them; otherwise none is released and the Workload stays pending
  (condition ``QuotaReserved`` False, reason ``Pending``, a message naming the short resource);
- pods whose scheduling-relevant fields (labels other than ``kueue.x-k8s.io/*``, images, requests,
  node selector, affinity, tolerations, ...) are equal form one pod set, so a per-pod label such as
  a rank splits the group into several pod sets (at most 8): put per-pod facts in annotations or env;
  ``kueue.x-k8s.io/pod-group-pod-index`` is the optional index label;
- the Workload (owned by the pods) appears only once all ``n`` pods exist (until then the pods
  get an ``ErrWorkloadCompose`` event), so pods may be created one by one;
- Kueue does not re-create pods: a lost pod of an admitted group is the creator's to replace, with
  the same metadata (the Workload keeps its quota, condition ``WaitingForReplacementPods``);
- each pod carries Kueue's finalizer ``kueue.x-k8s.io/managed`` until the group finishes (all pods
  succeeded), a failed pod's replacement appears, or the Workload is deleted.  So a group is torn
  down by deleting its Workload (Kueue then deletes the pods and lifts the finalizers); deleting
  only the pods, or their namespace, leaves them Terminating: since Kubernetes 1.33 namespace
  deletion removes pods before anything else (OrderedNamespaceDeletion), so it waits forever;
  the annotation ``kueue.x-k8s.io/retriable-in-group: "false"`` on a pod ends the group instead;
- Kueue manages pods only in namespaces its ``managedJobsNamespaceSelector`` matches: on the dev
  cluster those labelled ``kueue-managed=true`` (:func:`managed_namespace`); a default upstream
  install manages every namespace but kube-system and kueue-system.

Every function returns plain dicts for ``kubectl apply``/``create`` (the dev cluster) or any client.
"""

from __future__ import annotations

import copy

API_VERSION = "kueue.x-k8s.io/v1beta2"
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
WORKLOAD_RESOURCE = "workloads.kueue.x-k8s.io"  # a pod group's Workload is named after the group
POD_GROUP_NAME_LABEL = "kueue.x-k8s.io/pod-group-name"
POD_GROUP_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
MANAGED_LABEL = "kueue.x-k8s.io/managed"
ADMISSION_GATE = "kueue.x-k8s.io/admission"
MANAGED_NAMESPACE_LABEL = ("kueue-managed", "true")
DEFAULT_RESOURCES = ("cpu", "memory", "nvidia.com/gpu")


def managed_namespace(name: str, labels: dict[str, str] | None = None) -> dict:
    """A Namespace whose pods the dev cluster's Kueue manages (label ``kueue-managed=true``)."""
    key, value = MANAGED_NAMESPACE_LABEL
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {**(labels or {}), key: value}}}


def resource_flavor(name: str, node_labels: dict[str, str] | None = None) -> dict:
    """A ResourceFlavor; ``node_labels`` (e.g. ``{"nvidia.com/gpu.product": ...}``) steer admitted pods to those nodes."""
    spec = {"nodeLabels": dict(node_labels)} if node_labels else {}
    return {"apiVersion": API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": name}, "spec": spec}


def cluster_queue(name: str, flavor: str, quota: dict[str, str | int], *, namespace_selector: dict | None = None) -> dict:
    """A ClusterQueue with one flavor and a nominal quota per resource (``{"nvidia.com/gpu": 8, "cpu": 64, ...}``).

    Every resource a pod requests must be covered (an uncovered one makes the Workload inadmissible),
    so ``quota`` lists them all; :data:`DEFAULT_RESOURCES` is what muxtune's engine pods request.
    ``namespace_selector`` defaults to every namespace."""
    resources = list(quota)
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": namespace_selector if namespace_selector is not None else {},
            "resourceGroups": [{
                "coveredResources": resources,
                "flavors": [{"name": flavor, "resources": [{"name": r, "nominalQuota": str(quota[r])} for r in resources]}],
            }],
        },
    }


def local_queue(name: str, namespace: str, cluster_queue: str) -> dict:
    """A LocalQueue: what pods name in ``kueue.x-k8s.io/queue-name``."""
    return {"apiVersion": API_VERSION, "kind": "LocalQueue", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterQueue": cluster_queue}}


def queue_objects(name: str, namespace: str, quota: dict[str, str | int], *, flavor: str | None = None,
                  node_labels: dict[str, str] | None = None) -> list[dict]:
    """ResourceFlavor ``<flavor or name>``, ClusterQueue ``name`` with ``quota`` and LocalQueue ``name``
    in ``namespace``: the least a namespace needs before its pods can be admitted."""
    flavor = flavor or name
    return [resource_flavor(flavor, node_labels), cluster_queue(name, flavor, quota), local_queue(name, namespace, name)]


def pod_group_metadata(queue: str, group: str, total: int) -> dict:
    """The labels and annotation each of the ``total`` pods of ``group`` carries (``{"labels", "annotations"}``)."""
    if total < 1:
        raise ValueError(f"a pod group has at least one pod, not {total}")
    return {
        "labels": {QUEUE_NAME_LABEL: queue, POD_GROUP_NAME_LABEL: group},
        "annotations": {POD_GROUP_TOTAL_COUNT_ANNOTATION: str(total)},
    }


def in_pod_group(pod: dict, queue: str, group: str, total: int) -> dict:
    """A copy of the Pod manifest ``pod`` made a member of ``group`` (see :func:`pod_group_metadata`)."""
    out = copy.deepcopy(pod)
    meta = out.setdefault("metadata", {})
    extra = pod_group_metadata(queue, group, total)
    meta["labels"] = {**(meta.get("labels") or {}), **extra["labels"]}
    meta["annotations"] = {**(meta.get("annotations") or {}), **extra["annotations"]}
    return out


def condition(obj: dict, type_: str) -> dict | None:
    """The status condition ``type_`` of a Kueue object (e.g. a Workload's ``QuotaReserved``, ``Admitted``)."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def is_gated(pod: dict) -> bool:
    """True while Kueue holds the pod back (its admission scheduling gate is still on)."""
    return any(g.get("name") == ADMISSION_GATE for g in (pod.get("spec") or {}).get("schedulingGates") or [])
