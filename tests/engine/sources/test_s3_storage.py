"""muxtune.storage against a real S3 API server (moto's, on loopback): atomic, capped, secret-free."""
from __future__ import annotations

import pytest

from muxtune.storage import datasets, s3 as store
from muxtune.storage.errors import StorageError


def test_download_is_atomic_and_capped_before_the_body(s3, bucket, tmp_path):
    s3.client().put_object(Bucket=bucket, Key="d/train.jsonl", Body=b"x" * 1000)
    dest = tmp_path / "out" / "train.jsonl"
    meta = store.download(f"s3://{bucket}/d/train.jsonl", dest, max_bytes=1000)
    assert dest.read_bytes() == b"x" * 1000 and meta["size"] == 1000
    with pytest.raises(StorageError, match="larger than the dataset size cap of 999 bytes"):
        store.download(f"s3://{bucket}/d/train.jsonl", tmp_path / "o2" / "t.jsonl", max_bytes=999)
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())  # refused before any byte


def test_a_cut_transfer_never_becomes_a_file(s3, bucket, tmp_path):
    """The listing said 500 bytes, the body holds 1000 (it changed in between; the cap is 600):
    reading stops past the cap, and neither the target nor a temporary file is left."""
    s3.client().put_object(Bucket=bucket, Key="k", Body=b"y" * 1000)
    dest = tmp_path / "d" / "k"
    with pytest.raises(StorageError, match="grew past the dataset size cap"):
        store.download(f"s3://{bucket}/k", dest, max_bytes=600, expect={"size": 500, "etag": ""})
    assert list((tmp_path / "d").iterdir()) == []


@pytest.mark.parametrize("uri, why", [
    ("s3://no-such-bucket-x/k", "bucket 'no-such-bucket-x' does not exist"),
    ("s3://{bucket}/missing.jsonl", "no such object"),
])
def test_missing_bucket_or_key_is_named(s3, bucket, uri, why):
    with pytest.raises(StorageError) as e:
        store.head(uri.format(bucket=bucket))
    assert str(e.value) == f"{uri.format(bucket=bucket)}: {why}"


def test_wrong_credentials_are_refused_without_the_secret(s3, bucket, monkeypatch):
    s3.client().put_object(Bucket=bucket, Key="k", Body=b"z")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-Zq93xk")
    with pytest.raises(StorageError) as e:
        store.head(f"s3://{bucket}/k")
    assert "credentials were refused" in str(e.value) and "Zq93xk" not in str(e.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    with pytest.raises(StorageError, match="credentials were refused"):
        store.head(f"s3://{bucket}/k")


def test_fetched_dataset_is_cached_by_etag(s3, bucket):
    c = s3.client()
    c.put_object(Bucket=bucket, Key="t.jsonl", Body=b"one\n")
    uri = f"s3://{bucket}/t.jsonl"
    first = datasets.fetch(uri, 100)
    assert first.read_bytes() == b"one\n" and datasets.fetch(uri, 100) == first
    c.put_object(Bucket=bucket, Key="t.jsonl", Body=b"two\n")
    second = datasets.fetch(uri, 100)
    assert second != first and second.read_bytes() == b"two\n" and first.read_bytes() == b"one\n"


def test_staged_copy_lands_at_the_path_the_engine_reads(s3, bucket, tmp_path):
    s3.client().put_object(Bucket=bucket, Key="a/b/train.jsonl", Body=b"{}\n")
    uri = f"s3://{bucket}/a/b/train.jsonl"
    path = datasets.stage(uri, tmp_path, 100)
    assert path == tmp_path / datasets.staged_relpath(uri) and path.read_bytes() == b"{}\n"
    assert datasets.staged_relpath(uri).startswith(".muxtune-staged/") and path.name == "train.jsonl"
