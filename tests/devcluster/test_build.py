"""The cached control-plane binaries exist, report the pinned versions, and a
second ensure_binaries() is a cheap no-op."""

from __future__ import annotations

import subprocess
import time

import pytest

from muxtune.devcluster import build

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def bins() -> dict:
    return build.ensure_binaries()


def _out(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout + p.stderr


def test_second_call_is_a_noop(bins: dict) -> None:
    t = time.monotonic()
    assert build.ensure_binaries() == bins
    assert build.missing_binaries() == []
    assert time.monotonic() - t < 2


def test_binaries_report_pinned_versions(bins: dict) -> None:
    k8s = build.KUBERNETES_VERSION
    assert k8s in _out(str(bins["kube-apiserver"]), "--version")
    assert k8s in _out(str(bins["kube-controller-manager"]), "--version")
    assert k8s in _out(str(bins["kube-scheduler"]), "--version")
    assert k8s in _out(str(bins["kubectl"]), "version", "--client")
    assert build.ETCD_VERSION.lstrip("v") in _out(str(bins["etcd"]), "--version")
    assert build.KWOK_VERSION.lstrip("v") in _out(str(bins["kwok"]), "--version")
    assert build.HELM_VERSION in _out(str(bins["helm"]), "version", "--short")


def test_kwok_stages_cover_nodes_and_pods(bins: dict) -> None:
    text = build.kwok_stages_path().read_text()
    for stage in ("node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete"):
        assert f"name: {stage}" in text


def test_stamp_tracks_the_wrapper_module(bins: dict, tmp_path, monkeypatch) -> None:
    # a stamp written for other pins makes the binary stale
    stamp = tmp_path / "bin" / ".stamps" / "kwok.stamp"
    monkeypatch.setenv("MUXTUNE_CACHE_DIR", str(tmp_path))
    assert "kwok" in build.missing_binaries(["kwok"])
    stamp.parent.mkdir(parents=True)
    (tmp_path / "bin" / "kwok").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "bin" / "kwok").chmod(0o755)
    build.kwok_stages_path().parent.mkdir(parents=True)
    build.kwok_stages_path().write_text("")
    stamp.write_text("sigs.k8s.io/kwok@v0.0.1 wrapper=0\n")
    assert build.missing_binaries(["kwok"]) == ["kwok"]
    stamp.write_text(build._stamp_key(build.GROUPS["kwok"]) + "\n")
    assert build.missing_binaries(["kwok"]) == []
