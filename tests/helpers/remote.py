"""Real servers on loopback for the remote sources and sinks, started by the tests (as fixtures:
tests/engine/sources/conftest.py and the cluster transfer test import them from here).

- S3: moto's standalone server (`python -m moto.server`, the S3 API over HTTP) with IAM
  authentication on, so wrong credentials are refused as a real store refuses them.
- MLflow: `mlflow server` with a SQLite backend and an artifact store in a temporary directory.
- The Hub: no server can be reached here, so hf:// reads a Hub cache laid out exactly as
  huggingface_hub lays it out (blobs/, snapshots/<commit>/, refs/main) with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.cluster import free_port

REGION = "us-east-1"


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise RuntimeError(f"{url}: no answer after {timeout}s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=REGION)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """moto's S3 server on 127.0.0.1; after the first three calls (creating a user, its key and
    its policy) every request must be signed with that user's key."""
    import boto3

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3", "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", proc, 60, log)
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap", region_name=REGION)
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        stop(proc)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The standard AWS variables point at the server (as a user's shell would), for this test."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return s3_server


@pytest.fixture
def bucket(s3, request) -> str:
    """A fresh bucket per test."""
    name = "b-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    s3.client().create_bucket(Bucket=name)
    return name


@dataclass
class MlflowServer:
    uri: str
    root: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    root = tmp_path_factory.mktemp("mlflow")
    log = root / "server.log"
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc, 240, log)
        yield MlflowServer(uri, root)
    finally:
        stop(proc)


def hub_cache(cache: Path, repo: str, model_dir: Path, commit: str = "0" * 39 + "1") -> Path:
    """Lay model_dir out as huggingface_hub caches a repository: each file a content-named blob,
    snapshots/<commit>/ of relative symlinks to them, and refs/main naming the commit."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        shutil.copyfile(f, folder / "blobs" / blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snap
