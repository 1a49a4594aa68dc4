"""pytest plugin: a private local Kubernetes cluster for the test session.

Enable it from a conftest::

    pytest_plugins = ["muxtune.devcluster.fixture"]

and request ``kube_cluster`` (a :class:`muxtune.devcluster.cluster.ClusterInfo`)
or ``kubeconfig`` (its admin kubeconfig path as ``str``), or ``kueue_cluster``: the same cluster
with Kueue running on it (:mod:`muxtune.devcluster.kueue`; built on first use, a few more minutes
cold), managing pods only in namespaces labelled ``kueue-managed=true``, so the session's other
tests are untouched.  The plain ``kube_cluster`` never builds nor starts Kueue.  The first request
builds missing binaries (cold: many minutes, then cached under
``~/.cache/muxtune``) and starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok in a temporary directory; everything is stopped and
removed at the end of the session, also when tests fail, on Ctrl-C/SIGTERM,
and (through a detached watchdog) when pytest itself is killed.

Environment:

``MUXTUNE_TEST_CLUSTER_DIR``
    use (and keep running after the session) the cluster in this dir instead
    of a private one: fast edit-test loops; ``python -m
    muxtune.devcluster.cluster --state-dir DIR down`` stops it.
``MUXTUNE_TEST_GPU_NODES`` / ``MUXTUNE_TEST_GPUS_PER_NODE``
    kwok GPU nodes to create (default 2 x 8 ``nvidia.com/gpu``).
``MUXTUNE_SKIP_KUBE_TESTS=1``
    skip tests that need the cluster instead of building/starting it.
``MUXTUNE_SKIP_KUEUE_TESTS=1``
    skip only the tests that need Kueue.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from muxtune.devcluster import cluster as _cluster
from muxtune.devcluster.cluster import ClusterInfo


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the local control plane (built from the Go module proxy)")


def _sigterm_to_keyboardinterrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt("SIGTERM")


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterInfo]:
    if os.environ.get("MUXTUNE_SKIP_KUBE_TESTS") == "1":
        pytest.skip("MUXTUNE_SKIP_KUBE_TESTS=1")
    gpu_nodes = int(os.environ.get("MUXTUNE_TEST_GPU_NODES", "2"))
    gpus_per_node = int(os.environ.get("MUXTUNE_TEST_GPUS_PER_NODE", "8"))
    shared = os.environ.get("MUXTUNE_TEST_CLUSTER_DIR")
    if shared:
        yield _cluster.up(Path(shared), gpu_nodes, gpus_per_node=gpus_per_node)
        return

    # short path: unix socket paths (e.g. kwok's, etcd's) are limited to 108 bytes
    state_dir = tmp_path_factory.mktemp("kube", numbered=True)
    old_handler = None
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            old_handler = signal.signal(signal.SIGTERM, _sigterm_to_keyboardinterrupt)
    except ValueError:  # not in the main thread
        pass
    _cluster.spawn_reaper(state_dir)
    try:
        yield _cluster.up(state_dir, gpu_nodes, gpus_per_node=gpus_per_node)
    finally:
        _cluster.down(state_dir)
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


@pytest.fixture(scope="session")
def kubeconfig(kube_cluster: ClusterInfo) -> str:
    return str(kube_cluster.kubeconfig)


@pytest.fixture(scope="session")
def kueue_cluster(kube_cluster: ClusterInfo) -> Iterator[ClusterInfo]:
    if os.environ.get("MUXTUNE_SKIP_KUEUE_TESTS") == "1":
        pytest.skip("MUXTUNE_SKIP_KUEUE_TESTS=1")
    from muxtune.devcluster import kueue as _kueue

    info = _kueue.ensure(kube_cluster)
    yield info
    if not os.environ.get("MUXTUNE_TEST_CLUSTER_DIR"):  # a shared cluster keeps its Kueue
        _kueue.stop(info, quiet=True)
