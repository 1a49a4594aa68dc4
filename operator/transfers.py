"""Staging, export and model-cache Jobs: where tenants' credentials are used, and only there.

A task's credentials (spec.credentialsSecret) never enter a shared engine pod. Remote data moves
in Jobs of the task's own namespace that take the Secret as their environment (envFrom; the
operator never reads its data):

- staging: before the task joins a group, `muxtune stage data` copies its s3:// datasets into
  the namespace's data area (at the staged paths the engine reads with --no-remote);
- export: once the task Succeeded, `muxtune stage export` uploads its output directory (read-only
  mount) to output.uri/<namespace>/<name>/;
- model cache: a BaseModel with an hf or s3 source is fetched once by `muxtune stage model` into
  the model cache volume, in the operator's namespace with the BaseModel's own Secret; groups of
  that model mount the directory it reports read-only.

Names are derived from the object and what is moved, so a restart adopts the Job it made. Every
function here is pure: manifests and conditions from the objects, no API calls.
"""
from __future__ import annotations

import hashlib
import time
from datetime import datetime

from muxtune.api import sources
from muxtune.api.basemodel import BaseModelResource
from muxtune.api.finetunetask import FineTuneTask
from muxtune.operator.config import DATA_MOUNT, LABEL_MANAGED_BY, MANAGED_BY, OUTPUT_MOUNT, OperatorConfig
from muxtune.operator.podspec import RUN_AS, area_volumes
from muxtune.storage.export import destination
from muxtune.storage.stage_cli import RESULT_ERROR, RESULT_OK

RESULT_LOST_AFTER_S = 300  # a finished Job's pods gone this long: its result will never come

LABEL_TRANSFER = "muxtune.io/transfer"  # staging, export or model
LABEL_FOR = "muxtune.io/for"  # the task's or BaseModel's name
CACHE_MOUNT = "/cache"
BACKOFF_LIMIT = 2
DEADLINE_S = 6 * 3600


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def remote_datasets(task: FineTuneTask) -> list[str]:
    d = task.spec.dataset
    return [u for u in (d.path, d.validation_path) if sources.is_remote(u)]


def needs_staging(task: FineTuneTask) -> bool:
    return bool(remote_datasets(task))


def needs_export(task: FineTuneTask) -> bool:
    return task.spec.output.uri is not None


def staging_job_name(task: FineTuneTask) -> str:
    return f"{task.metadata.name[:40]}-stage-{_digest(task.metadata.uid or '', *remote_datasets(task))}"


def export_job_name(task: FineTuneTask) -> str:
    return f"{task.metadata.name[:40]}-export-{_digest(task.metadata.uid or '', task.spec.output.uri or '')}"


def model_job_name(bm: BaseModelResource) -> str:
    return f"model-{bm.metadata.name[:40]}-{_digest(bm.metadata.uid or '', bm.spec.source.remote_uri or '')}"


def _container(args: list[str], config: OperatorConfig, secret: str | None, mounts: list[dict], env: list[dict]) -> dict:
    c = {
        "name": "transfer", "image": config.transfer_image, "imagePullPolicy": config.engine_image_pull_policy,
        "command": ["muxtune"], "args": args, "volumeMounts": mounts, "env": env,
        "terminationMessagePolicy": "File",
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}},
    }
    if secret:
        c["envFrom"] = [{"secretRef": {"name": secret}}]
    return c


def _job(name: str, namespace: str, kind: str, owner: str, container: dict, volumes: list[dict]) -> dict:
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_TRANSFER: kind, LABEL_FOR: owner}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": BACKOFF_LIMIT, "activeDeadlineSeconds": DEADLINE_S,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never", "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                                        "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [*volumes, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def _area(kind: str, namespace: str, config: OperatorConfig, writable: bool) -> tuple[list[dict], list[dict]]:
    vols, mounts = area_volumes(kind, {"metadata": {"namespace": namespace}}, config)
    for v in vols:
        if "persistentVolumeClaim" in v:
            v["persistentVolumeClaim"]["readOnly"] = not writable
    return vols, [{**m, "readOnly": not writable} for m in mounts]


TMP = [{"name": "TMPDIR", "value": "/tmp"}, {"name": "HOME", "value": "/tmp"}]
TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}


def size_cap(task: FineTuneTask, config: OperatorConfig) -> tuple[int, str | None]:
    """(the staging Job's size cap, why the task may not be staged): the task's dataset.maxBytes
    may lower the operator's cap, never raise it."""
    asked = task.spec.dataset.max_bytes
    if asked is not None and asked > config.max_dataset_bytes:
        return config.max_dataset_bytes, (f"dataset.maxBytes {asked} is over this cluster's cap of "
                                          f"{config.max_dataset_bytes} bytes (the operator's --max-dataset-bytes)")
    return asked or config.max_dataset_bytes, None


def staging_job(task: FineTuneTask, config: OperatorConfig) -> dict:
    """The Job that copies the task's s3:// datasets into its namespace's data area."""
    ns = task.metadata.namespace or "default"
    vols, mounts = _area("data", ns, config, writable=True)
    args = ["stage", "data", *remote_datasets(task), "--data-area", f"{DATA_MOUNT}/{ns}",
            "--max-dataset-bytes", str(size_cap(task, config)[0])]
    c = _container(args, config, task.spec.credentials_secret, [*mounts, TMP_MOUNT], TMP)
    return _job(staging_job_name(task), ns, "staging", task.metadata.name, c, vols)


def export_job(task: FineTuneTask, config: OperatorConfig) -> dict:
    """The Job that uploads the finished task's directory to output.uri."""
    ns = task.metadata.namespace or "default"
    vols, mounts = _area("output", ns, config, writable=False)
    task_dir = f"{OUTPUT_MOUNT}/{ns}/{task.spec.output.path or task.metadata.name}"
    args = ["stage", "export", task_dir, "--to", destination(task)]
    if task.spec.output.upload_checkpoints:
        args.append("--checkpoints")
    c = _container(args, config, task.spec.credentials_secret, [*mounts, TMP_MOUNT], TMP)
    return _job(export_job_name(task), ns, "export", task.metadata.name, c, vols)


def model_job(bm: BaseModelResource, config: OperatorConfig) -> dict:
    """The Job that fetches an hf:// or s3:// BaseModel into the model cache volume, once."""
    src = bm.spec.source
    vols = [{"name": "cache", "persistentVolumeClaim": {"claimName": config.model_cache_pvc}}] \
        if config.model_cache_pvc else [{"name": "cache", "emptyDir": {}}]
    env = [*TMP, {"name": "MUXTUNE_HOME", "value": CACHE_MOUNT}, {"name": "HF_HUB_CACHE", "value": f"{CACHE_MOUNT}/hub"}]
    c = _container(["stage", "model", src.remote_uri], config, src.credentials_secret,
                   [{"name": "cache", "mountPath": CACHE_MOUNT}, TMP_MOUNT], env)
    return _job(model_job_name(bm), config.shared_namespace, "model", bm.metadata.name, c, vols)


def _result(pods) -> str:
    """The Job's result: its pods' termination message (muxtune/storage/stage_cli.py), a success
    first (a retry that worked), else the last pod's."""
    messages = [p["terminationMessage"].strip() for p in pods if p.get("terminationMessage")]
    return next((m for m in messages if m.startswith(RESULT_OK)), messages[-1] if messages else "")


def job_outcome(job: dict | None, pods: list[dict] = (), now: float | None = None) -> tuple[str, str]:
    """(state, message) of a transfer Job: Absent, Running, Succeeded or Failed, from its finished
    pods' result (operator/world.py compact_pod keeps the termination message). A finished Job
    without a result yet is still Running: on a kwok node the pod completes before the stand-in
    kubelet has run it and reported what it did (a real kubelet reports both at once). A finished
    Job whose pods are all gone for RESULT_LOST_AFTER_S can never report: Failed, saying so."""
    if job is None:
        return "Absent", ""
    conds = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    failed = conds.get("Failed") or conds.get("FailureTarget")
    if not failed and "Complete" not in conds and "SuccessCriteriaMet" not in conds:
        return "Running", ""
    result = _result(pods)
    if result.startswith(RESULT_OK):
        return "Succeeded", result.removeprefix(RESULT_OK)
    if result.startswith(RESULT_ERROR):
        return "Failed", result.removeprefix(RESULT_ERROR)
    if failed:  # no container said why (image pull, deadline, eviction): the Job's own reason
        return "Failed", (result or failed.get("message") or failed.get("reason") or "").strip()
    if result:  # an older transfer image's result, unprefixed: only a container writes one
        return "Succeeded", result
    if not pods and _finished_for(job, now) > RESULT_LOST_AFTER_S:  # deleted pods took the result with them
        return "Failed", (f"Job {job['metadata']['name']} finished but its pods, and the result they held, are "
                          "gone; delete the Job to run it again")
    return "Running", ""


def _finished_for(job: dict, now: float | None) -> float:
    """Seconds since the Job finished (its completionTime); 0 when it does not say."""
    done = (job.get("status") or {}).get("completionTime")
    if not done:
        return 0.0
    at = datetime.fromisoformat(done.replace("Z", "+00:00")).timestamp()
    return (time.time() if now is None else now) - at
