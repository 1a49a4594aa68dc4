"""The cluster's transfer Jobs: their manifests keep each tenant's Secret in its namespace, and
their containers, run on this host as the e2e tests run engine pods, move the data against
moto's S3 server; the engine then reads the staged copy with --no-remote, as in a pod."""
from __future__ import annotations

import json

from muxtune.api.basemodel import BaseModelResource
from muxtune.api.finetunetask import FineTuneTask
from muxtune.engine.data.datafile import DataLimits
from muxtune.operator import podspec, resources, transfers
from muxtune.operator.config import OperatorConfig
from tests.helpers.data import write_jsonl
from tests.helpers.jobrunner import run_job

CFG = OperatorConfig(data_pvc="datasets", output_pvc="outputs", model_cache_pvc="model-cache")


def _task(ns: str, name: str, secret: str, bucket: str, **output) -> FineTuneTask:
    return FineTuneTask.model_validate({
        "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}"},
        "spec": {"baseModel": "builtin:tiny-llama", "credentialsSecret": secret,
                 "dataset": {"path": f"s3://{bucket}/{ns}/train.jsonl", "validationPath": f"s3://{bucket}/{ns}/val.jsonl",
                             "maxSeqLen": 48},
                 "peft": {"r": 4}, "training": {"maxSteps": 2, "batchSize": 4, "learningRate": 1e-3},
                 "output": {"uri": f"s3://{bucket}/adapters", **output}}})


def _secret_refs(obj) -> set[str]:
    """Every Secret name an object refers to (envFrom, secretKeyRef, secret volumes)."""
    found = set()

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("secretRef", "secretKeyRef") and isinstance(v, dict):
                    found.add(v["name"])
                elif k == "secret" and isinstance(v, dict) and "secretName" in v:
                    found.add(v["secretName"])
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(obj)
    return found


def test_a_tenants_secret_stays_in_its_namespaces_jobs():
    a, b = _task("team-a", "t", "a-creds", "bk1"), _task("team-b", "t", "b-creds", "bk1")
    for task, own in ((a, "a-creds"), (b, "b-creds")):
        for job in (transfers.staging_job(task, CFG), transfers.export_job(task, CFG)):
            assert job["metadata"]["namespace"] == task.metadata.namespace
            assert _secret_refs(job) == {own}
            pod = job["spec"]["template"]["spec"]
            assert pod["automountServiceAccountToken"] is False
            mounts = pod["containers"][0]["volumeMounts"]
            assert {m["mountPath"] for m in mounts} == {f"/{'data' if 'stage-' in job['metadata']['name'] else 'output'}/"
                                                        f"{task.metadata.namespace}", "/tmp"}
    assert transfers.export_job(a, CFG)["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["readOnly"]
    # a group shared by both namespaces: its engine pod refers to no tenant Secret, only its key
    group = {"metadata": {"name": "mt-x", "namespace": "mux-system", "uid": "gid",
                          "annotations": {"muxtune.io/namespaces": "team-a,team-b", "muxtune.io/gpu-memory-mib": "81920"}},
             "spec": {"baseModel": "builtin:tiny-llama", "gpusPerPod": 1, "parallelism": {"dp": 1, "tp": 1, "pp": 1}}}
    pod = resources.pod_manifest(group, 0, CFG)
    assert _secret_refs(pod) == {resources.key_secret_name(group)}
    assert "a-creds" not in json.dumps(pod) and "b-creds" not in json.dumps(pod)
    assert "--no-remote" in pod["spec"]["containers"][0]["args"]


def test_model_job_runs_in_the_operator_namespace_with_the_models_secret():
    bm = BaseModelResource.model_validate({"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel",
                                           "metadata": {"name": "tiny", "uid": "bmu"},
                                           "spec": {"source": {"s3": {"uri": "s3://bk1/models/tiny/"},
                                                               "credentialsSecret": "platform-creds"}}})
    job = transfers.model_job(bm, CFG)
    assert job["metadata"]["namespace"] == CFG.shared_namespace and _secret_refs(job) == {"platform-creds"}
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["stage", "model", "s3://bk1/models/tiny/"]
    staged = {"spec": bm.spec.to_wire(), "status": {"cachePath": "models/s3-0123456789abcdef"}}
    vol, mount = podspec.model_volume("model:tiny", staged, CFG)
    assert vol["persistentVolumeClaim"] == {"claimName": "model-cache", "readOnly": True}
    assert mount == {"name": "model", "mountPath": "/models/tiny", "readOnly": True, "subPath": "models/s3-0123456789abcdef"}


def test_staging_then_engine_then_export_as_in_a_cluster(s3, bucket, tmp_path, trainer_factory, data_root):
    """Staging Job -> the engine with --no-remote reads the staged copy -> export Job uploads."""
    c = s3.client()
    src = tmp_path / "src"
    src.mkdir()
    for name, seed in (("train.jsonl", 1), ("val.jsonl", 2)):
        c.upload_file(str(write_jsonl(src / name, 32, seed=seed)), bucket, f"team-a/{name}")
    task = _task("team-a", "t", "a-creds", bucket)
    data, output = data_root / "cluster-data", tmp_path / "output"
    (data / "team-a").mkdir(parents=True)
    secrets = {"a-creds": s3.env()}
    rc, out, _ = run_job(transfers.staging_job(task, CFG), {"/data/team-a": data / "team-a", "/tmp": tmp_path},
                         secrets, tmp_path)
    assert rc == 0, out
    trainer = trainer_factory(output, base_dir=data / "team-a")
    trainer.data_limits, trainer.remote = DataLimits(fetch=False), False  # what --no-remote sets in the pod
    rt = trainer.add_task(task)
    trainer.run()
    assert rt.phase == "Succeeded", rt.message
    assert "adapters/team-a/t/adapter_config.json" not in {o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])}
    rc, out, term = run_job(transfers.export_job(task, CFG), {"/output/team-a": output / "team-a", "/tmp": tmp_path},
                            secrets, tmp_path)
    assert rc == 0, out
    assert c.get_object(Bucket=bucket, Key="adapters/team-a/t/adapter_model.safetensors")["Body"].read() == \
        (rt.out_dir / "adapter_model.safetensors").read_bytes()


def test_staging_with_wrong_credentials_fails_with_the_reason_and_no_secret(s3, bucket, tmp_path):
    task = _task("team-a", "t", "a-creds", bucket)
    c = s3.client()
    c.put_object(Bucket=bucket, Key="team-a/train.jsonl", Body=b"{}\n")
    c.put_object(Bucket=bucket, Key="team-a/val.jsonl", Body=b"{}\n")
    (tmp_path / "data").mkdir()
    secret = "Sup3rSecretValue-x81"
    rc, out, term = run_job(transfers.staging_job(task, CFG), {"/data/team-a": tmp_path / "data", "/tmp": tmp_path},
                            {"a-creds": {**s3.env(), "AWS_SECRET_ACCESS_KEY": secret}}, tmp_path)
    assert rc == 1 and term.startswith("error: ") and "the credentials were refused" in term
    assert secret not in out + term
    assert not list((tmp_path / "data").rglob("*.jsonl"))  # nothing half-staged


def test_model_job_stages_a_backbone_once_and_reports_its_path(s3, bucket, tmp_path, tiny_backbone_dir):
    c = s3.client()
    for f in tiny_backbone_dir.iterdir():
        if f.is_file():
            c.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    bm = BaseModelResource.model_validate({"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel",
                                           "metadata": {"name": "tiny", "uid": "bmu"},
                                           "spec": {"source": {"s3": {"uri": f"s3://{bucket}/models/tiny/"},
                                                               "credentialsSecret": "platform"}}})
    cache = tmp_path / "cache"
    cache.mkdir()
    job = transfers.model_job(bm, CFG)
    rc, out, term = run_job(job, {"/cache": cache, "/tmp": tmp_path}, {"platform": s3.env()}, tmp_path)
    assert rc == 0, out
    path = term.removeprefix("ok: ").splitlines()[0]  # then config.json's figures, for the operator
    assert term.startswith("ok: models/s3-") and (cache / path / "config.json").is_file()
    rc, out, again = run_job(job, {"/cache": cache, "/tmp": tmp_path}, {"platform": s3.env()}, tmp_path)
    assert rc == 0 and again == term


def test_the_jobs_commands_run_without_the_engine_or_torch(tmp_path, s3, bucket):
    """The Jobs run the operator's image, which has neither engine/ nor torch: `muxtune stage`
    must import and work with both missing."""
    import subprocess
    import sys

    s3.client().put_object(Bucket=bucket, Key="k.jsonl", Body=b"{}\n")
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith(('torch.', 'muxtune.engine')):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from muxtune.cli import main\n"
        "main(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", code, "stage", "data", f"s3://{bucket}/k.jsonl", "--data-area",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert list(tmp_path.rglob("k.jsonl"))


def test_the_staging_jobs_size_cap_is_the_admins_and_a_task_may_only_lower_it(s3, bucket, tmp_path):
    """--max-dataset-bytes (chart: transfer.maxDatasetBytes) caps what a staging Job copies and is
    what engine pods read up to; dataset.maxBytes lowers it for one task, and asking more than the
    cap fails that task before any Job runs."""
    from muxtune.operator.transfer_plan import plan_transfers

    c = s3.client()
    c.put_object(Bucket=bucket, Key="team-a/train.jsonl", Body=b'{"prompt": "p", "completion": "c"}\n' * 40)  # 1400 B
    c.put_object(Bucket=bucket, Key="team-a/val.jsonl", Body=b"{}\n")
    cfg = OperatorConfig(data_pvc="datasets", output_pvc="outputs", max_dataset_bytes=5000)
    task = _task("team-a", "t", "creds", bucket)
    (tmp_path / "data").mkdir()
    mounts = {"/data/team-a": tmp_path / "data", "/tmp": tmp_path}
    rc, out, _ = run_job(transfers.staging_job(task, cfg), mounts, {"creds": s3.env()}, tmp_path)
    assert rc == 0, out
    args = podspec.engine_args(cfg)
    assert args[args.index("--max-dataset-bytes") + 1] == "5000"
    assert "--max-dataset-bytes" not in podspec.engine_args(CFG)  # the default cap is the engine's own

    lower = task.model_copy(deep=True)
    lower.spec.dataset.max_bytes = 1000
    rc, out, term = run_job(transfers.staging_job(lower, cfg), mounts, {"creds": s3.env()}, tmp_path)
    assert rc == 1 and "larger than the dataset size cap of 1000 bytes" in term, out

    higher = task.model_copy(deep=True)
    higher.spec.dataset.max_bytes = 10**10
    obj = {"metadata": {"name": "t", "namespace": "team-a"}}
    plan = plan_transfers({"team-a/t": (obj, higher)}, {}, {}, {}, cfg)
    assert plan.create == [] and plan.holds["team-a/t"].final
    assert "over this cluster's cap of 5000 bytes" in plan.holds["team-a/t"].message
