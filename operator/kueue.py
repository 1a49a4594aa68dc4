"""The operator's side of Kueue's plain-pod group integration: reading and deleting a group's Workload.

A queued group's pods carry the queue label, the pod-group name (the BackboneGroup's name) and the
total count (operator/podspec.py), so Kueue makes them one Workload named after the group and
releases their scheduling gates all at once, when its ClusterQueue has quota for every pod.

* Why a group waits: the Workload's ``QuotaReserved`` condition (e.g. "couldn't assign flavors to
  pod set main: insufficient quota for nvidia.com/gpu in flavor ..."), shown on the tasks.
* Tearing down or restarting a group: delete its Workload first. Kueue keeps a finalizer on every
  pod of the group until the Workload goes (or the group succeeds), so deleting only the pods, or
  their namespace, would leave them Terminating; with the Workload deleted Kueue removes the pods
  and lifts the finalizers, and recreated pods form a new Workload of the same name, so a group is
  recreated only once the old Workload is gone.

Without Kueue installed, or without the chart's rights on Workloads, a Workload reads as absent.
"""
from __future__ import annotations

import logging

from muxtune.operator.config import KUEUE_API
from muxtune.operator.kube import ApiError

log = logging.getLogger("muxtune.operator")
ABSENT = (403, 404)


async def workload(client, namespace: str, name: str) -> dict | None:
    """The group's Workload, or None when there is none (or Kueue is not there)."""
    try:
        return await client.get(KUEUE_API, "workloads", namespace, name)
    except ApiError as e:
        if e.status in ABSENT:
            return None
        raise


async def delete_workload(client, namespace: str, name: str) -> None:
    try:
        await client.delete(KUEUE_API, "workloads", namespace, name)
    except ApiError as e:
        if e.status not in ABSENT:
            raise


async def gone(client, namespace: str, name: str) -> bool:
    """True once the group has no Workload left; a stale one (its pods gone) is deleted first."""
    wl = await workload(client, namespace, name)
    if wl is None:
        return True
    if not (wl.get("metadata") or {}).get("deletionTimestamp"):
        log.info("group %s/%s: deleting the Workload left from its previous pods", namespace, name)
        await delete_workload(client, namespace, name)
    return False


def condition(wl: dict, type_: str) -> dict | None:
    return next((c for c in (wl.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def waiting_message(wl: dict | None) -> str:
    """Why Kueue has not admitted the group yet, in Kueue's words where it gave them."""
    if wl is None:
        return "Kueue holds the group's pods (scheduling gate) until it has made and admitted their Workload"
    reserved = condition(wl, "QuotaReserved")
    if reserved and reserved.get("status") == "False" and reserved.get("message"):
        return f"Kueue: {reserved['message']}"
    admitted = condition(wl, "Admitted")
    if admitted and admitted.get("status") == "True":
        return "Kueue admitted the group; its pods are being released"
    return f"Kueue has not admitted Workload {wl['metadata']['name']} yet"
