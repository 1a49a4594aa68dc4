"""The cluster path of remote data (issue 17), against the dev cluster and moto's S3 server: the
operator holds a task with an s3:// dataset until its staging Job, in the task's namespace with the
task's Secret, has finished; exports a Succeeded task's adapter with an export Job (a failed
export fails the task); stages hf:// and s3:// BaseModels into the model cache once, which a
group mounts read-only and trains on; and no engine pod or other namespace's Job refers to the
tenant's Secret. Each Job's container runs on this host, as the e2e tests run engine pods (the
Job's own argv and environment, the Secret as environment, temp dirs for its mounts), and its
exit code and result are reported on its pod as a kubelet would (kwok completes Job pods
without running them: tests/helpers/jobrunner.py)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import cluster as kh
from tests.helpers.jobrunner import run_and_report
from tests.helpers.remote import bucket, s3, s3_server  # noqa: F401 - fixtures

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]
OPERATOR_ARGS = ["--model-cache-pvc", "model-cache"]


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
    rc, out, _ = run_and_report(info, staging, {f"/data/{ns}": data, "/tmp": tmp_path}, {"tenant-creds": s3.env()},
                                tmp_path)
    assert rc == 0, out
    assert list(data.glob(".muxtune-staged/*/train.jsonl"))

    def conditions(name, namespace=ns):
        st = kh.kjson(info, "get", "ftt", name, "-n", namespace).get("status") or {}
        return {c["type"]: c for c in st.get("conditions") or []}, st

    def staged_and_placed():
        conds, st = conditions("remote")
        return st if conds.get("DataStaged", {}).get("status") == "True" and st.get("group") else None

    st = kh.wait_for(staged_and_placed, 120, interval=1, what="DataStaged=True and the task placed")
    # the engine is told the staged copy, inside the task's own area, where the Job put it
    from muxtune.storage.datasets import staged_relpath

    staged = f"{ns}/{staged_relpath(f's3://{bucket}/sets/train.jsonl')}"
    kh.wait_for(lambda: staged in kh.kjson(info, "get", "configmap", f"{st['group']}-tasks", "-n", ns)["data"]["tasks.yaml"],
                30, what="the group's tasks file naming the staged copy")
    assert (data / staged.split("/", 1)[1]).is_file()
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
    rc, out, _ = run_and_report(info, export, {f"/output/{ns}": tmp_path / "output", "/tmp": tmp_path},
                                {"tenant-creds": s3.env()}, tmp_path)
    assert rc == 0, out
    assert c.get_object(Bucket=bucket, Key=f"adapters/{ns}/remote/adapter_model.safetensors")["Body"].read() == b"weights"
    kh.wait_for(lambda: conditions("remote")[0].get("Exported", {}).get("status") == "True", 60, interval=1,
                what="Exported=True")
    assert conditions("remote")[1]["phase"] == "Succeeded"


def _status(info, kind, name, ns=None):
    return kh.kjson(info, "get", kind, name, *(["-n", ns] if ns else [])).get("status") or {}


def test_a_failed_export_fails_the_task_and_keeps_its_adapter(operator_env, s3, bucket, tmp_path):  # noqa: F811
    """Wrong credentials for output.uri: the export Job fails, and with it the Succeeded task
    (reason ExportFailed), as `muxtune run` fails it; the adapter stays on the output volume."""
    info, ns = operator_env["info"], operator_env["a"]
    bad = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "not-the-key-0c7e"}
    info.kubectl("create", "secret", "generic", "bad-creds", "-n", ns, *[f"--from-literal={k}={v}" for k, v in bad.items()])
    task = kh.task_manifest("unexported", ns, data="local.jsonl", suspend=True)
    task["spec"].update(credentialsSecret="bad-creds", output={"uri": f"s3://{bucket}/adapters"})
    kh.apply(info, task)
    kh.wait_for(lambda: _status(info, "ftt", "unexported", ns).get("phase") == "Suspended", 60, what="Suspended")
    out_dir = tmp_path / "output" / "unexported"
    out_dir.mkdir(parents=True)
    (out_dir / "adapter_config.json").write_text("{}")
    (out_dir / "adapter_model.safetensors").write_bytes(b"weights")
    # the engine's part is covered locally; the task is marked done as an engine leaves it
    info.kubectl("patch", "ftt", "unexported", "-n", ns, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": {"phase": "Succeeded"}}))
    export = kh.wait_for(lambda: (kh.kjson(info, "get", "jobs", "-n", ns, "-l", "muxtune.io/for=unexported")["items"]
                                  or [None])[0], 60, what="the export Job")
    rc, out, term = run_and_report(info, export, {f"/output/{ns}": tmp_path / "output", "/tmp": tmp_path},
                                   {"bad-creds": bad}, tmp_path)
    assert rc == 1 and "not-the-key" not in out + term
    st = kh.wait_for(lambda: (s := _status(info, "ftt", "unexported", ns)).get("phase") == "Failed" and s, 60,
                     interval=1, what="the task Failed")
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Failed"]["reason"] == "ExportFailed" and conds["Exported"]["status"] == "False"
    assert "credentials were refused" in st["message"] and "adapter is kept" in st["message"]
    assert "not-the-key" not in json.dumps(st)
    assert (out_dir / "adapter_model.safetensors").read_bytes() == b"weights"


def _basemodel(name, ns, source, secret, arch):
    return {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": name},
            "spec": {"source": {**source, "credentialsSecret": secret}, "allowedNamespaces": [ns], "architecture": arch}}


def _model_cache_claims(info, namespaces: list[str], tag: str) -> list[str]:
    """The model cache claim (--model-cache-pvc) in each namespace, each bound to a volume of its own
    (a PersistentVolume binds one claim; in a real cluster they would share one RWX store)."""
    pvs = []
    for ns in namespaces:
        pv = f"model-cache-{tag}-{ns}"[:63]
        size = {"storage": "1Gi"}
        kh.apply(info, {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                        "spec": {"capacity": size, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": "/var/lib/muxtune/cache"},
                                 "claimRef": {"namespace": ns, "name": "model-cache"}}},
                 {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "model-cache", "namespace": ns},
                  "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                           "resources": {"requests": size}}})
        pvs.append(pv)
    return pvs


def _stage_model(info, system, name, cache, secrets, tmp_path):
    """Run the BaseModel's Job once it exists (as its kubelet would) and return its final status."""
    def job():
        items = kh.kjson(info, "get", "jobs", "-n", system, "-l", f"muxtune.io/for={name}")["items"]
        return items[0] if items else None

    manifest = kh.wait_for(job, 60, what=f"the model Job of {name}")
    assert _status(info, "basemodel", name).get("phase") == "Staging"
    rc, out, term = run_and_report(info, manifest, {"/cache": cache, "/tmp": tmp_path}, secrets, tmp_path)
    return rc, out, kh.wait_for(lambda: (s := _status(info, "basemodel", name)).get("phase") in ("Ready", "Failed") and s,
                                60, interval=1, what=f"{name} Ready or Failed")


def _train_on_the_cache(info, ns, s3name, cache, data, tmp_path):
    """The group of the s3 model mounts its directory in the cache, read-only, and trains on it."""
    from muxtune.devcluster.hostengines import HostEngines

    path = _status(info, "basemodel", s3name)["cachePath"]

    def bound_pod():
        pods = kh.kjson(info, "get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=engine")["items"]
        return pods[0] if pods and pods[0]["spec"].get("nodeName") else None

    pod = kh.wait_for(bound_pod, 120, what="the group's pod bound")
    vol = next(v for v in pod["spec"]["volumes"] if v["name"] == "model")
    mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert vol["persistentVolumeClaim"] == {"claimName": "model-cache", "readOnly": True}
    assert mount["readOnly"] and mount["subPath"] == path and mount["mountPath"] == f"/models/{s3name}"
    # the kubelet's mount, on this host: /models/<name> is the cache directory
    link = Path("/models") / s3name
    try:
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(cache / path)
    except OSError as exc:
        pytest.skip(f"cannot stand in for the pod's /models mount here: {exc}")
    engines = HostEngines(info.kubectl, data, tmp_path / "output", tmp_path / "engines")
    try:
        engines.engines[pod["metadata"]["uid"]] = engines._start(pod)  # this pod only: other tests' pods are not ours
        st = kh.wait_for(lambda: (s := _status(info, "ftt", "on-cache", ns)).get("phase") in ("Succeeded", "Failed") and s,
                         300, interval=1, what="the task trained on the staged model")
        assert st["phase"] == "Succeeded", st
        assert (tmp_path / "output" / ns / "on-cache" / "adapter_model.safetensors").is_file()
    finally:
        engines.close()
        link.unlink()


def test_hf_and_s3_basemodels_are_staged_once_and_a_group_trains_on_the_cache(
        operator_env, s3, bucket, tmp_path, tiny_backbone_dir):  # noqa: F811
    from tests.helpers.kubelet import write_data
    from tests.helpers.remote import hub_cache

    info, ns, system = operator_env["info"], operator_env["a"], operator_env["system"]
    tag = ns.rsplit("-", 1)[-1]
    cfg = json.loads((tiny_backbone_dir / "config.json").read_text())
    arch = {"parameters": 200_000, "layers": cfg["num_hidden_layers"], "hiddenSize": cfg["hidden_size"],
            "numAttentionHeads": cfg["num_attention_heads"], "vocabSize": cfg["vocab_size"]}
    c = s3.client()
    for f in tiny_backbone_dir.iterdir():
        if f.is_file():
            c.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    cache = tmp_path / "cache"  # the model cache volume
    hub_cache(cache / "hub", "acme/tiny", tiny_backbone_dir)  # as huggingface_hub left it there
    pvs = _model_cache_claims(info, [system, ns], tag)
    secrets = {"platform": {**s3.env(), "HF_HUB_OFFLINE": "1"}, "wrong": {**s3.env(), "AWS_SECRET_ACCESS_KEY": "nope-4f1"}}
    for secret, env in secrets.items():
        info.kubectl("create", "secret", "generic", secret, "-n", system, *[f"--from-literal={k}={v}" for k, v in env.items()])
    s3name, hfname = f"s3-{tag}", f"hf-{tag}"
    kh.apply(info, _basemodel(s3name, ns, {"s3": {"uri": f"s3://{bucket}/models/tiny/"}}, "platform", arch),
             _basemodel(hfname, ns, {"hf": {"repo": "acme/tiny"}}, "platform", arch),
             _basemodel(f"gone-{tag}", ns, {"s3": {"uri": f"s3://{bucket}/models/none/"}}, "platform", arch),
             _basemodel(f"nobucket-{tag}", ns, {"s3": {"uri": f"s3://no-such-{tag}/models/tiny/"}}, "platform", arch),
             _basemodel(f"denied-{tag}", ns, {"s3": {"uri": f"s3://{bucket}/models/tiny/"}}, "wrong", arch))
    data = tmp_path / "data"
    (data / ns).mkdir(parents=True)
    task = kh.task_manifest("on-cache", ns, base=f"model:{s3name}", data=write_data(data / ns, "rev.jsonl", 24, 1),
                            steps=3, seq=32)
    kh.apply(info, task)
    kh.wait_for(lambda: any(c["reason"] == "ModelStaging" for c in _status(info, "ftt", "on-cache", ns).get("conditions", [])),
                60, what="the task held while its model stages")

    cases = {s3name: "Ready", hfname: "Ready", f"gone-{tag}": "no config.json",
             f"nobucket-{tag}": "does not exist", f"denied-{tag}": "credentials were refused"}
    with ThreadPoolExecutor(3) as pool:  # the Jobs run side by side, as on a cluster's nodes
        outcomes = dict(zip(cases, pool.map(lambda n: _stage_model(info, system, n, cache, secrets, tmp_path), cases)))
    for name, want in cases.items():
        rc, out, st = outcomes[name]
        if want == "Ready":
            assert rc == 0 and st["phase"] == "Ready", (out, st)
            assert (cache / st["cachePath"] / "config.json").is_file() and not (cache / st["cachePath"]).is_symlink()
        else:
            assert rc == 1 and st["phase"] == "Failed" and want in st["message"], (out, st)
            assert "nope-4f1" not in json.dumps(st)
    assert _status(info, "basemodel", hfname)["cachePath"] != _status(info, "basemodel", s3name)["cachePath"]

    try:
        _train_on_the_cache(info, ns, s3name, cache, data, tmp_path)
    finally:
        info.kubectl("delete", "pv", *pvs, "--wait=false", check=False)
