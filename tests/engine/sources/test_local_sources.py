"""`muxtune run` with remote sources and sinks: s3:// datasets, output.uri, hf:// and s3:// backbones.

Against moto's S3 server on loopback and a Hub cache laid out as huggingface_hub lays it out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from muxtune.engine.data.datafile import DataLimits
from tests.helpers.data import data_path
from tests.helpers.remote import hub_cache

REPO = Path(__file__).resolve().parents[3]


def _losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _s3_task(make_task, name, data_dir, uri, **spec):
    t = make_task(name, data_dir / "reverse.jsonl", steps=3)
    dataset = t.spec.dataset.model_copy(update={"path": uri, **spec.pop("dataset", {})})
    return t.model_copy(update={"spec": t.spec.model_copy(update={"dataset": dataset, **spec})})


@pytest.mark.slow
def test_s3_dataset_trains_as_the_same_local_file_and_the_adapter_is_uploaded(
        s3, bucket, make_task, data_dir, tmp_path, trainer_factory):
    c = s3.client()
    c.upload_file(str(data_dir / "reverse.jsonl"), bucket, "sets/reverse.jsonl")
    c.upload_file(str(data_dir / "upper.jsonl"), bucket, "sets/upper.jsonl")
    from muxtune.api.finetunetask import OutputSpec

    remote = _s3_task(make_task, "remote", data_dir, f"s3://{bucket}/sets/reverse.jsonl",
                      dataset={"validation_path": f"s3://{bucket}/sets/upper.jsonl"},
                      output=OutputSpec(uri=f"s3://{bucket}/adapters"))
    local = make_task("local", data_dir / "reverse.jsonl", steps=3)
    local = local.model_copy(update={"spec": local.spec.model_copy(update={"dataset": local.spec.dataset.model_copy(
        update={"validation_path": data_path(data_dir / "upper.jsonl")})})})
    for t in (remote, local):
        trainer = trainer_factory(tmp_path / t.metadata.name)
        trainer.add_task(t)
        trainer.run()
        assert trainer.tasks[t.key].phase == "Succeeded", trainer.tasks[t.key].message
    r_dir, l_dir = tmp_path / "remote/default/remote", tmp_path / "local/default/local"
    assert _losses(r_dir) == _losses(l_dir)  # the same bytes, the same training
    keys = {o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="adapters/")["Contents"]}
    assert {"adapters/default/remote/adapter_config.json", "adapters/default/remote/adapter_model.safetensors",
            "adapters/default/remote/metrics.jsonl"} <= keys
    assert not any("checkpoints/" in k or k.endswith("status.json") for k in keys), keys
    body = c.get_object(Bucket=bucket, Key="adapters/default/remote/adapter_model.safetensors")["Body"].read()
    assert body == (r_dir / "adapter_model.safetensors").read_bytes()


def test_bad_remote_data_fails_each_task_alone_with_its_reason(s3, bucket, make_task, data_dir, tmp_path,
                                                               trainer_factory):
    c = s3.client()
    c.put_object(Bucket=bucket, Key="big.jsonl", Body=(data_dir / "reverse.jsonl").read_bytes() * 4)
    cases = {
        "missing-key": (f"s3://{bucket}/nope.jsonl", f"dataset.path: s3://{bucket}/nope.jsonl: no such object"),
        "missing-bucket": ("s3://no-such-bucket-q/x.jsonl", "bucket 'no-such-bucket-q' does not exist"),
        "too-big": (f"s3://{bucket}/big.jsonl", "larger than the dataset size cap of 10000 bytes"),
    }
    trainer = trainer_factory(tmp_path / "out")
    trainer.data_limits = DataLimits(max_file_bytes=10000)
    for name, (uri, _) in cases.items():
        trainer.add_task(_s3_task(make_task, name, data_dir, uri))
    good = make_task("good", data_dir / "upper.jsonl", steps=2)
    trainer.add_task(good)
    trainer.run()
    for name, (_, reason) in cases.items():
        rt = trainer.tasks[f"default/{name}"]
        assert rt.phase == "Failed" and reason in rt.message, rt.message
        assert json.loads((rt.out_dir / "status.json").read_text())["message"] == rt.message
    assert trainer.tasks[good.key].phase == "Succeeded"
    cached = list((Path(os.environ["MUXTUNE_HOME"]) / "datasets").rglob("big.jsonl*"))
    assert cached == []  # refused before its body was read: nothing half-written, nothing cached


def test_wrong_credentials_fail_the_task_and_no_secret_is_written(s3, bucket, make_task, data_dir, tmp_path,
                                                                  trainer_factory, monkeypatch, caplog):
    s3.client().upload_file(str(data_dir / "reverse.jsonl"), bucket, "r.jsonl")
    secret = "WrongSecretValue-8c1f2e"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    trainer = trainer_factory(tmp_path / "out")
    rt = trainer.add_task(_s3_task(make_task, "creds", data_dir, f"s3://{bucket}/r.jsonl"))
    assert rt.phase == "Failed" and "the credentials were refused (SignatureDoesNotMatch)" in rt.message
    written = "".join(p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert secret not in written and secret not in caplog.text and secret not in rt.message


def test_upload_refused_fails_the_task_but_keeps_the_adapter(s3, bucket, make_task, data_dir, tmp_path,
                                                            trainer_factory):
    from muxtune.api.finetunetask import OutputSpec

    t = make_task("up", data_dir / "reverse.jsonl", steps=2)
    t = t.model_copy(update={"spec": t.spec.model_copy(update={"output": OutputSpec(uri="s3://no-such-bucket-u/x")})})
    trainer = trainer_factory(tmp_path / "out")
    trainer.add_task(t)
    trainer.run()
    rt = trainer.tasks[t.key]
    assert rt.phase == "Failed" and "output.uri: s3://no-such-bucket-u/x/default/up/" in rt.message
    assert "bucket 'no-such-bucket-u' does not exist" in rt.message
    assert (rt.out_dir / "adapter_model.safetensors").exists()


def _upload_model(c, bucket: str, prefix: str, model_dir: Path) -> None:
    for f in model_dir.iterdir():
        if f.is_file():
            c.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def test_s3_backbone_is_fetched_once_keyed_by_content(s3, bucket, tiny_backbone_dir):
    from muxtune.engine.model.loading import resolve_base_model

    c = s3.client()
    _upload_model(c, bucket, "models/tiny", tiny_backbone_dir)
    first = resolve_base_model(f"s3://{bucket}/models/tiny/")
    assert (first / "config.json").read_bytes() == (tiny_backbone_dir / "config.json").read_bytes()
    assert first.parent.name == "models" and first.name.startswith("s3-")
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".s3-")]  # no temporary left
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_base_model(f"s3://{bucket}/models/tiny") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # not fetched again
    c.put_object(Bucket=bucket, Key="models/tiny/generation_config.json", Body=b"{}")
    assert resolve_base_model(f"s3://{bucket}/models/tiny/") != first  # changed content, new copy


def test_hf_backbone_from_the_hub_cache_offline(tmp_path, tiny_backbone_dir):
    """huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when imported, as in any process a
    user starts: so each resolution runs in a fresh one."""
    cache = tmp_path / "hub"
    snap = hub_cache(cache, "acme/tiny", tiny_backbone_dir, commit="a" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    code = ("import sys\nfrom muxtune.storage.models import fetch_model\nfrom muxtune.storage.errors import StorageError\n"
            "try: print(fetch_model(sys.argv[1]))\nexcept StorageError as e: print('error:', e)")

    def resolve(ref: str) -> str:
        p = subprocess.run([sys.executable, "-c", code, ref], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    assert resolve("hf://acme/tiny") == str(snap)
    assert resolve("hf://acme/tiny@" + "a" * 40) == str(snap)
    assert resolve("hf://acme/other") == "error: hf://acme/other: not in the Hub cache, and offline (HF_HUB_OFFLINE) or the Hub cannot be reached"


@pytest.mark.slow
def test_cli_run_with_hf_backbone_s3_data_and_upload(s3, bucket, data_dir, tmp_path, tiny_backbone_dir):
    """The whole path through `muxtune run`: credentials and endpoint from the AWS variables, the
    backbone from the Hub cache; --no-remote reads only a staged copy."""
    c = s3.client()
    c.upload_file(str(data_dir / "reverse.jsonl"), bucket, "r.jsonl")
    hub_cache(tmp_path / "hub", "acme/tiny", tiny_backbone_dir)
    doc = {"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": "cli", "namespace": "team"},
           "spec": {"baseModel": "hf://acme/tiny", "dataset": {"path": f"s3://{bucket}/r.jsonl", "maxSeqLen": 48},
                    "peft": {"r": 4}, "training": {"maxSteps": 2, "batchSize": 4, "learningRate": 1e-3},
                    "output": {"uri": f"s3://{bucket}/out"}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "muxtune.cli", "run", str(tmp_path / "t.yaml"), "--device", "cpu", "--no-progress",
           "--data-root", str(tmp_path)]
    p = subprocess.run([*run, "--output", str(tmp_path / "o1")], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert c.head_object(Bucket=bucket, Key="out/team/cli/adapter_model.safetensors")["ContentLength"] > 0
    p = subprocess.run([*run, "--output", str(tmp_path / "o2"), "--no-remote"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "no staged copy in the data area" in p.stdout + p.stderr
