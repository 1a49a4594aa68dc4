"""The cluster path of remote data (issue 17), against the dev cluster and moto's S3 server: the
operator holds a task with an s3:// dataset until its staging Job, in the task's namespace with the
task's Secret, has finished; exports a Succeeded task's adapter with an export Job; and no engine
pod or other namespace's Job refers to the tenant's Secret. Each Job's container runs on this
host (the kubelet here is kwok, which only marks Job pods complete), as the e2e tests run engine
pods: the Job's own argv and environment, the Secret as environment, temp dirs for its mounts."""
from __future__ import annotations

import json

import pytest

from tests.helpers import cluster as kh
from tests.helpers.jobrunner import run_job
from tests.helpers.remote import bucket, s3, s3_server  # noqa: F401 - fixtures

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _secret_refs(obj) -> set[str]:
    text = json.dumps(obj)
    return {n for n in ("tenant-creds",) if n in text}


def test_staging_and_export_jobs_carry_the_tenants_secret_and_nothing_else_does(operator_env, s3, bucket, tmp_path):  # noqa: F811
    info, ns, other = operator_env["info"], operator_env["a"], operator_env["b"]
    c = s3.client()
    c.put_object(Bucket=bucket, Key="sets/train.jsonl",
                 Body=b"".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}).encode() + b"\n" for i in range(8)))
    info.kubectl("create", "secret", "generic", "tenant-creds", "-n", ns,
                 *[f"--from-literal={k}={v}" for k, v in s3.env().items()])
    task = kh.task_manifest("remote", ns, data=f"s3://{bucket}/sets/train.jsonl")
    task["spec"].update(credentialsSecret="tenant-creds", output={"uri": f"s3://{bucket}/adapters"})
    neighbour = kh.task_manifest("local", other)
    kh.apply(info, task, neighbour)

    def job(kind):
        items = kh.kjson(info, "get", "jobs", "-n", ns, "-l", f"muxtune.io/transfer={kind}")["items"]
        return items[0] if items else None

    staging = kh.wait_for(lambda: job("staging"), 60, what="the staging Job")
    assert staging["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "tenant-creds"}}]
    data = tmp_path / "data"
    rc, out, _ = run_job(staging, {f"/data/{ns}": data, "/tmp": tmp_path}, {"tenant-creds": s3.env()}, tmp_path)
    assert rc == 0, out
    assert list(data.glob(".muxtune-staged/*/train.jsonl"))

    def conditions(name, namespace=ns):
        st = kh.kjson(info, "get", "ftt", name, "-n", namespace).get("status") or {}
        return {c["type"]: c for c in st.get("conditions") or []}, st

    def staged_and_placed():
        conds, st = conditions("remote")
        return st if conds.get("DataStaged", {}).get("status") == "True" and st.get("group") else None

    st = kh.wait_for(staged_and_placed, 120, interval=1, what="DataStaged=True and the task placed")
    # every pod that exists now: only the tenant's Job pods (in its namespace) refer to its Secret
    for namespace in (operator_env["system"], ns, other):
        for pod in kh.kjson(info, "get", "pods", "-n", namespace)["items"]:
            refs = _secret_refs(pod["spec"])
            is_transfer = "muxtune.io/transfer" in (pod["metadata"].get("labels") or {})
            assert not refs or (is_transfer and namespace == ns), (namespace, pod["metadata"]["name"])
            if "muxtune.io/group" in (pod["metadata"].get("labels") or {}):
                assert "--no-remote" in pod["spec"]["containers"][0]["args"]
    assert not _secret_refs(kh.kjson(info, "get", "jobs", "-n", other))

    # the engine's part is covered locally (tests/engine/sources); here the task is marked done with
    # an adapter in its output area, as an engine leaves it, and the export follows
    out_dir = tmp_path / "output" / "remote"
    out_dir.mkdir(parents=True)
    (out_dir / "adapter_config.json").write_text("{}")
    (out_dir / "adapter_model.safetensors").write_bytes(b"weights")
    info.kubectl("patch", "ftt", "remote", "-n", ns, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": {"phase": "Succeeded", "group": st["group"]}}))
    export = kh.wait_for(lambda: job("export"), 60, what="the export Job")
    assert export["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "tenant-creds"}}]
    rc, out, _ = run_job(export, {f"/output/{ns}": tmp_path / "output", "/tmp": tmp_path}, {"tenant-creds": s3.env()},
                         tmp_path)
    assert rc == 0, out
    assert c.get_object(Bucket=bucket, Key=f"adapters/{ns}/remote/adapter_model.safetensors")["Body"].read() == b"weights"
    kh.wait_for(lambda: conditions("remote")[0].get("Exported", {}).get("status") == "True", 60, interval=1,
                what="Exported=True")
    assert conditions("remote")[1]["phase"] == "Succeeded"
