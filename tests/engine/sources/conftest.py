"""Fixtures of the remote sources' tests: real S3 (moto) and MLflow servers on loopback
(tests/helpers/remote.py)."""
from tests.helpers.remote import bucket, mlflow_server, s3, s3_server  # noqa: F401 - fixtures
