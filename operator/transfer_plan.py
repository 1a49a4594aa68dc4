"""What the reconciler should do about remote data this pass: a pure function of the world.

From the tasks, BaseModels, transfer Jobs and their pods (operator/transfers.py), it says which
Jobs to create, which tasks must wait (or fail) before placement and why, each task's stage
conditions (DataStaged, Exported), and each staged BaseModel's status (Staging, Ready, Failed).
A failed export fails the Succeeded task (operator/status.py), as `muxtune run` does.
The reconciler applies it: Jobs created, holds merged into the policy refusals (so a held task
is neither planned nor joins a group), conditions and BaseModel statuses patched.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from muxtune.api.basemodel import ArchitectureFigures, BaseModelResource
from muxtune.api.finetunetask import FineTuneTask
from muxtune.operator import transfers
from muxtune.operator.config import OperatorConfig
from muxtune.operator.policy import Refusal
from muxtune.operator.status import EXPORT_FAILED

TERMINAL = ("Succeeded", "Failed")


@dataclass
class TransferPlan:
    create: list[dict] = field(default_factory=list)  # Job manifests that do not exist yet
    holds: dict[str, Refusal] = field(default_factory=dict)  # task key -> why it is not placed
    conditions: dict[str, list[dict]] = field(default_factory=dict)  # task key -> stage conditions
    models: dict[str, dict] = field(default_factory=dict)  # BaseModel name -> status fields


def _cond(type_: str, ok: bool, reason: str, message: str) -> dict:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message}


def _outcome(job_name: str, namespace: str, jobs: dict, job_pods: dict) -> tuple[str, str]:
    key = (namespace, job_name)
    return transfers.job_outcome(jobs.get(key), job_pods.get(key, []))


def _staging(plan: TransferPlan, key: str, task: FineTuneTask, jobs, job_pods, config) -> None:
    ns, name = task.metadata.namespace or "default", transfers.staging_job_name(task)
    over = transfers.size_cap(task, config)[1]
    if over:
        plan.holds[key] = Refusal("DataStagingFailed", over, True)
        plan.conditions[key] = [_cond("DataStaged", False, "DataStagingFailed", over)]
        return
    state, msg = _outcome(name, ns, jobs, job_pods)
    if state == "Absent":
        plan.create.append(transfers.staging_job(task, config))
    if state in ("Absent", "Running"):
        why = f"the staging Job {name} is copying the s3:// datasets into the namespace's data area"
        plan.holds[key] = Refusal("StagingData", why, False)
        plan.conditions[key] = [_cond("DataStaged", False, "StagingData", why)]
    elif state == "Failed":
        why = f"staging the datasets failed (Job {name}): {msg or 'no reason given'}"
        plan.holds[key] = Refusal("DataStagingFailed", why, True)
        plan.conditions[key] = [_cond("DataStaged", False, "DataStagingFailed", why)]
    else:
        plan.conditions[key] = [_cond("DataStaged", True, "Staged", f"copied by Job {name}")]


def _export(plan: TransferPlan, key: str, task: FineTuneTask, jobs, job_pods, config) -> None:
    ns, name = task.metadata.namespace or "default", transfers.export_job_name(task)
    state, msg = _outcome(name, ns, jobs, job_pods)
    if state == "Absent":
        plan.create.append(transfers.export_job(task, config))
    if state in ("Absent", "Running"):
        cond = _cond("Exported", False, "Exporting", f"the export Job {name} is uploading the adapter")
    elif state == "Failed":
        cond = _cond("Exported", False, EXPORT_FAILED, f"output.uri: {msg or 'the upload failed'} (export Job {name})")
    else:
        cond = _cond("Exported", True, "Uploaded", f"{msg or 'uploaded'} to {transfers.destination(task)}")
    plan.conditions.setdefault(key, []).append(cond)


def _model_status(bm: BaseModelResource, jobs, job_pods, config: OperatorConfig, plan: TransferPlan) -> dict:
    if not config.model_cache_pvc:
        return {"phase": "Failed", "message": "no model cache volume to stage hf/s3 weights into: set the chart's "
                                              "modelCache.pvc (--model-cache-pvc)"}
    name = transfers.model_job_name(bm)
    state, msg = _outcome(name, config.shared_namespace, jobs, job_pods)
    if state == "Absent":
        plan.create.append(transfers.model_job(bm, config))
    if state in ("Absent", "Running"):
        return {"phase": "Staging", "message": f"the Job {name} is fetching {bm.spec.source.remote_uri}"}
    if state == "Failed":
        return {"phase": "Failed", "message": f"staging failed (Job {name}): {msg or 'no reason given'}"}
    path, _, figures = msg.partition("\n")
    out = {"phase": "Ready", "cachePath": path, "message": f"staged into the model cache at {path}"}
    read = _read_figures(figures)
    if read:
        out["configArchitecture"] = read
    return out


def _read_figures(text: str) -> dict:
    """The figures the model-cache Job read from config.json (muxtune/storage/stage_cli.py), on the
    wire; {} when it reported none or nothing usable (the BaseModel's message then says so)."""
    try:
        return ArchitectureFigures.model_validate(json.loads(text)).model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude_unset=True)
    except ValueError:
        return {}


def plan_transfers(tasks: dict[str, tuple[dict, FineTuneTask | str]], basemodels: dict[str, dict],
                   jobs: dict[tuple[str, str], dict], job_pods: dict[tuple[str, str], list[dict]],
                   config: OperatorConfig) -> TransferPlan:
    """tasks: key -> (object, parsed task or its parse error); basemodels: name -> object; jobs and
    job_pods keyed by (namespace, Job name)."""
    plan = TransferPlan()
    for name, obj in sorted(basemodels.items()):
        try:
            bm = BaseModelResource.model_validate({k: v for k, v in obj.items() if k != "status"})
        except ValueError:  # not ours to judge here: the planner reports an unusable BaseModel
            continue
        if bm.spec.source.remote_uri:
            plan.models[name] = _model_status(bm, jobs, job_pods, config, plan)
    for key, (obj, task) in sorted(tasks.items()):
        if isinstance(task, str) or obj["metadata"].get("deletionTimestamp"):
            continue
        phase = (obj.get("status") or {}).get("phase")
        if phase not in TERMINAL and transfers.needs_staging(task):
            _staging(plan, key, task, jobs, job_pods, config)
        if phase not in TERMINAL and task.spec.base_model.startswith("model:") and key not in plan.holds:
            bname = task.spec.base_model.split(":", 1)[1]
            model, recorded = plan.models.get(bname), (basemodels.get(bname) or {}).get("status") or {}
            # held until the BaseModel's status says where its weights are: pods are made from it
            if model is not None and (model["phase"] != "Ready" or recorded.get("cachePath") != model["cachePath"]):
                plan.holds[key] = Refusal("ModelStaging", f"{task.spec.base_model}: {model['message']}", False)
        if phase == "Succeeded" and transfers.needs_export(task):
            _export(plan, key, task, jobs, job_pods, config)
    return plan
