"""Helpers shared by the tests, one module per topic; tests import them from here (conftest.py
files hold fixtures only). The repository root is on sys.path through pyproject's pytest
`pythonpath`, so `from tests.helpers.data import task_doc` works under any import mode and in
processes that the tests start (spawned ranks inherit sys.path)."""
