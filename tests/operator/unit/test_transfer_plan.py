"""operator/transfer_plan.py: which transfer Jobs to create, which tasks wait or fail before
placement and why, stage conditions, and BaseModel staging status (pure; no cluster)."""
from __future__ import annotations

from datetime import datetime

from muxtune.api.basemodel import BaseModelResource
from muxtune.api.finetunetask import FineTuneTask
from muxtune.operator import transfers
from muxtune.operator.config import OperatorConfig
from muxtune.operator.transfer_plan import plan_transfers

CFG = OperatorConfig(data_pvc="d", output_pvc="o", model_cache_pvc="cache")


def _task(name="t", ns="a", phase=None, base="builtin:tiny-llama", uri=True):
    obj = {"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask",
           "metadata": {"name": name, "namespace": ns, "uid": f"u-{name}"},
           "spec": {"baseModel": base, "credentialsSecret": "creds",
                    "dataset": {"path": "s3://bk1/train.jsonl" if uri else "train.jsonl"},
                    "training": {"maxSteps": 2, "learningRate": 1e-3}, "output": {"uri": "s3://bk1/out"}}}
    if phase:
        obj["status"] = {"phase": phase}
    return f"{ns}/{name}", (obj, FineTuneTask.model_validate(obj))


def _job(manifest, condition=None, message=""):
    job = dict(manifest, status={"conditions": [{"type": condition, "status": "True"}]} if condition else {})
    pods = [{"terminationMessage": message}] if message else []  # as operator/world.py compact_pod keeps it
    key = (manifest["metadata"]["namespace"], manifest["metadata"]["name"])
    return {key: job}, {key: pods}


def test_a_task_with_s3_data_waits_for_its_staging_job_then_is_released():
    key, (obj, task) = _task()
    plan = plan_transfers({key: (obj, task)}, {}, {}, {}, CFG)
    assert [j["metadata"]["name"] for j in plan.create] == [transfers.staging_job_name(task)]
    assert plan.holds[key].reason == "StagingData" and not plan.holds[key].final
    assert plan.conditions[key][0]["type"] == "DataStaged" and plan.conditions[key][0]["status"] == "False"
    jobs, pods = _job(transfers.staging_job(task, CFG), "Complete", "ok: staged")
    plan = plan_transfers({key: (obj, task)}, {}, jobs, pods, CFG)
    assert not plan.create and key not in plan.holds
    assert plan.conditions[key] == [{"type": "DataStaged", "status": "True", "reason": "Staged",
                                     "message": f"copied by Job {transfers.staging_job_name(task)}"}]


def test_a_failed_staging_job_fails_the_task_with_its_termination_message():
    key, (obj, task) = _task()
    jobs, pods = _job(transfers.staging_job(task, CFG), "Failed", "error: s3://bk1/train.jsonl: the credentials were refused")
    plan = plan_transfers({key: (obj, task)}, {}, jobs, pods, CFG)
    hold = plan.holds[key]
    assert hold.final and hold.reason == "DataStagingFailed" and "the credentials were refused" in hold.message


def test_local_data_needs_no_job_and_export_starts_after_succeeded():
    key, (obj, task) = _task(uri=False)
    assert plan_transfers({key: (obj, task)}, {}, {}, {}, CFG).create == []
    key, (obj, task) = _task(uri=False, phase="Succeeded")
    plan = plan_transfers({key: (obj, task)}, {}, {}, {}, CFG)
    assert [j["metadata"]["name"] for j in plan.create] == [transfers.export_job_name(task)]
    jobs, pods = _job(transfers.export_job(task, CFG), "Failed", "error: s3://bk1/out/a/t/adapter_config.json: upload failed: access denied")
    (cond,) = plan_transfers({key: (obj, task)}, {}, jobs, pods, CFG).conditions[key]
    assert cond["type"] == "Exported" and cond["reason"] == "ExportFailed" and "access denied" in cond["message"]


def test_a_staged_basemodel_goes_staging_ready_and_holds_its_tasks_until_then():
    bm = {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": "tiny", "uid": "b1"},
          "spec": {"source": {"hf": {"repo": "acme/tiny"}}, "allowedNamespaces": ["*"]}}
    key, (obj, task) = _task(base="model:tiny", uri=False)
    plan = plan_transfers({key: (obj, task)}, {"tiny": bm}, {}, {}, CFG)
    assert plan.models["tiny"]["phase"] == "Staging" and plan.holds[key].reason == "ModelStaging"
    (job,) = plan.create
    assert job["metadata"]["namespace"] == CFG.shared_namespace
    jobs, pods = _job(transfers.model_job(BaseModelResource.model_validate(bm), CFG), "Complete", "ok: models/hf-0123")
    plan = plan_transfers({key: (obj, task)}, {"tiny": bm}, jobs, pods, CFG)
    assert plan.models["tiny"] == {"phase": "Ready", "cachePath": "models/hf-0123",
                                   "message": "staged into the model cache at models/hf-0123"}
    assert key in plan.holds and not plan.create  # until the status saying where the weights are is written
    bm["status"] = {"phase": "Ready", "cachePath": "models/hf-0123"}
    assert key not in plan_transfers({key: (obj, task)}, {"tiny": bm}, jobs, pods, CFG).holds
    no_cache = plan_transfers({}, {"tiny": bm}, {}, {}, OperatorConfig())
    assert no_cache.models["tiny"]["phase"] == "Failed" and "modelCache.pvc" in no_cache.models["tiny"]["message"]


def _snapshot(tasks: dict, groups: dict):
    from muxtune.operator.snapshot import Snapshot

    return Snapshot(now="2026-01-01T00:00:00Z", tasks=tasks, groups=groups, pods_of={}, configmaps={}, services={},
                    inventory=(), basemodels={}, architectures={}, namespace_labels={}, reserved_names=frozenset(),
                    planner_config=CFG.planner_config())


def test_a_held_task_leaves_its_group_and_is_not_planned():
    from muxtune.operator.snapshot import membership, pending_requests

    key, (obj, task) = _task()
    other, (oobj, otask) = _task("u", uri=False)
    group = {"metadata": {"name": "g", "namespace": "a"},
             "spec": {"tasks": [{"namespace": "a", "name": "t", "uid": "u-t"}, {"namespace": "a", "name": "u"}]}}
    snap = _snapshot({key: obj, other: oobj}, {("a", "g"): group})
    parsed = {key: task, other: otask}
    held = plan_transfers({key: (obj, task), other: (oobj, otask)}, {}, {}, {}, CFG).holds
    assert set(held) == {key}
    ms = membership(snap, parsed, holds=held)
    assert ms.active[("a", "g")] == [other] and ms.refused[key].reason == "StagingData"
    assert pending_requests(snap, ms) == []  # held: not handed to the planner either
    free = membership(snap, parsed)  # no holds: both stay members
    assert free.active[("a", "g")] == [key, other]


def test_transfer_job_pods_are_found_by_their_job_and_engine_pods_are_not():
    from muxtune.operator.snapshot import pods_by_job

    pods = {("a", "p1"): {"namespace": "a", "labels": {transfers.LABEL_TRANSFER: "staging", "job-name": "j"}},
            ("a", "p2"): {"namespace": "a", "labels": {"muxtune.io/group": "g", "job-name": "j"}},
            ("a", "p3"): {"namespace": "a", "labels": {transfers.LABEL_TRANSFER: "export"}}}
    assert pods_by_job(pods) == {("a", "j"): [pods[("a", "p1")]]}


def test_the_outcome_is_the_jobs_result_not_its_condition_alone():
    """kwok completes a Job's pod without running it: a finished Job waits for its result, and an
    error result fails it even though the Job says Complete (a real kubelet reports both at once)."""
    key, (obj, task) = _task()
    job = transfers.staging_job(task, CFG)
    assert transfers.job_outcome(_job(job, "Complete")[0].popitem()[1], []) == ("Running", "")
    complete = _job(job, "Complete")[0].popitem()[1]
    assert transfers.job_outcome(complete, [{"terminationMessage": "error: s3://bk1/x: no such bucket"}]) == \
        ("Failed", "s3://bk1/x: no such bucket")
    retried = [{"terminationMessage": "error: timed out"}, {"terminationMessage": "ok: staged"}]
    assert transfers.job_outcome(complete, retried) == ("Succeeded", "staged")
    failed = dict(job, status={"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                               "message": "Job was active longer than specified deadline"}]})
    assert transfers.job_outcome(failed, []) == ("Failed", "Job was active longer than specified deadline")
    assert transfers.job_outcome(dict(job, status={}), retried) == ("Running", "")
    # pods deleted after the Job finished took its result: it fails once that has lasted, saying so
    done = dict(complete, status={**complete["status"], "completionTime": "2026-01-01T00:00:00Z"})
    t0 = datetime.fromisoformat("2026-01-01T00:00:00+00:00").timestamp()
    assert transfers.job_outcome(done, [], now=t0 + 10) == ("Running", "")
    state, why = transfers.job_outcome(done, [], now=t0 + transfers.RESULT_LOST_AFTER_S + 1)
    assert state == "Failed" and "pods, and the result they held, are gone" in why
    assert transfers.job_outcome(done, [{"phase": "Succeeded"}], now=t0 + 10_000) == ("Running", "")  # kwok: not run yet
    # an older transfer image's unprefixed result still counts (only a container writes one)
    assert transfers.job_outcome(complete, [{"terminationMessage": "models/hf-1"}]) == ("Succeeded", "models/hf-1")


def test_a_failed_export_fails_the_succeeded_task_as_muxtune_run_does():
    from muxtune.operator import status

    key, (obj, task) = _task(uri=False, phase="Succeeded")
    jobs, pods = _job(transfers.export_job(task, CFG), "Failed", "error: s3://bk1/out: access denied")
    stages = tuple(plan_transfers({key: (obj, task)}, {}, jobs, pods, CFG).conditions[key])
    old = {"phase": "Succeeded", "message": "training finished; adapter written",
           "conditions": [{"type": "Complete", "status": "True", "reason": "Succeeded"}]}
    new = status.compute_status(old, status.TaskView(None, None, "member", stages=stages), "2026-01-01T00:00:00Z")
    conds = {c["type"]: c for c in new["conditions"]}
    assert new["phase"] == "Failed" and "access denied" in new["message"] and "adapter is kept" in new["message"]
    assert conds["Failed"]["reason"] == conds["Exported"]["reason"] == "ExportFailed"
    assert conds["Complete"]["status"] == "False"
    # once Failed, the export is not planned again and the status stays as it is
    failed_obj = dict(obj, status=new)
    assert key not in plan_transfers({key: (failed_obj, task)}, {}, jobs, pods, CFG).conditions
    ok = _job(transfers.export_job(task, CFG), "Complete", "ok: uploaded 2 file(s)")
    stages = tuple(plan_transfers({key: (obj, task)}, {}, *ok, CFG).conditions[key])
    kept = status.compute_status(old, status.TaskView(None, None, "member", stages=stages), "2026-01-01T00:00:00Z")
    assert kept["phase"] == "Succeeded"


def test_the_engine_reads_each_dataset_inside_its_namespaces_area_and_staged_objects_where_the_job_put_them():
    """The staging Job writes /data/<ns>/<staged path>; the engine's --data-root is /data."""
    from muxtune.operator import resources
    from muxtune.storage.datasets import staged_relpath

    key, (obj, task) = _task()
    job = transfers.staging_job(task, CFG)
    area = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert area[area.index("--data-area") + 1] == "/data/a"
    doc = resources.engine_task_document(task)
    assert doc["spec"]["dataset"]["path"] == "a/" + staged_relpath("s3://bk1/train.jsonl")
    obj["spec"]["dataset"]["validationPath"] = "held/val.jsonl"
    doc = resources.engine_task_document(FineTuneTask.model_validate(obj))
    assert doc["spec"]["dataset"]["validationPath"] == "a/held/val.jsonl"  # never another namespace's area
