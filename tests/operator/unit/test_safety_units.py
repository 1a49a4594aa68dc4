"""Pure parts of issue 9's operator fixes: signed task files and reports, the BaseModel namespace
policy, per-namespace mounts, pod controls, pod-creation backoff, stale-status conditions and the
kubernetes-package credentials (an exec plugin, its refresh, no files left behind). No cluster."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from muxtune.api.finetunetask import FineTuneTask
from muxtune.facts import trust
from muxtune.operator import policy, podspec, resources, status
from muxtune.operator.config import OperatorConfig
from muxtune.operator.groups import PodBackoff
from muxtune.operator.keys import GroupKeys
from muxtune.operator.planner import PlannerConfig, TaskRequest
from muxtune.operator.poller import EnginePoller

KEY = b"k" * 64
NOW = "2025-01-01T00:00:00Z"


# --------------------------------------------------------------------------- muxtune/facts/trust.py

def test_tasks_signature_binds_content_group_and_revision():
    text = b"apiVersion: muxtune.io/v1alpha1\n"
    sig = trust.sign_tasks(KEY, "g1", 5, text)
    assert trust.verify_tasks(KEY, "g1", text, sig) == 5
    bad = [
        (KEY, "g1", text + b"x", sig, 0, "differs"),  # edited tasks file
        (KEY, "g2", text, sig, 0, "signed for group"),  # another group's file copied over
        (b"x" * 64, "g1", text, sig, 0, "does not verify"),  # another key
        (KEY, "g1", text, sig, 6, "older"),  # replay of an older revision
        (KEY, "g1", text, "", 0, "no readable signature"),
        (KEY, "g1", text, json.dumps({**json.loads(sig), "revision": 9}), 0, "does not verify"),
    ]
    for key, group, t, s, min_rev, word in bad:
        with pytest.raises(trust.TrustError, match=word):
            trust.verify_tasks(key, group, t, s, min_rev)


def test_report_signature_and_forgery():
    payload = {"tasks": {"ns/a": {"phase": "Running", "step": 3, "loss": 1.25}}}
    signed = trust.sign_report(KEY, "g1", payload, now=100.0)
    body, t = trust.verify_report(KEY, "g1", json.loads(json.dumps(signed)))  # through JSON, as polled
    assert body == payload and t == 100.0
    forged = json.loads(json.dumps(signed))
    forged["tasks"]["ns/a"]["step"] = 999
    for p, word in [(forged, "does not verify"), (payload, "unsigned"),
                    (trust.sign_report(KEY, "g2", payload), "signed for group"),
                    (trust.sign_report(b"y" * 64, "g1", payload), "does not verify")]:
        with pytest.raises(trust.TrustError, match=word):
            trust.verify_report(KEY, "g1", p)


def test_engine_guard_checks_files_and_revision(tmp_path, monkeypatch):
    (tmp_path / "key").write_text(KEY.decode())
    monkeypatch.setenv(trust.ENV_KEY_FILE, str(tmp_path / "key"))
    monkeypatch.setenv(trust.ENV_GROUP, "g1")
    g = trust.Guard.from_env()
    f = tmp_path / "tasks.yaml"
    f.write_text("a: 1\n")
    trust.signature_path(f).write_text(trust.sign_tasks(KEY, "g1", 7, "a: 1\n"))
    g.check([f])
    assert g.revision == 7
    f.write_text("a: 2\n")  # a tenant edits the ConfigMap
    with pytest.raises(trust.TrustError, match="differs"):
        g.check([f])
    trust.signature_path(f).write_text(trust.sign_tasks(KEY, "g1", 6, "a: 2\n"))
    with pytest.raises(trust.TrustError, match="older"):
        g.check([f])
    assert g.signed(lambda: {"tasks": {}})()["auth"]["group"] == "g1"


def test_group_keys_differ_per_group_object():
    keys = GroupKeys(b"m" * 32)
    g = {"metadata": {"namespace": "a", "name": "g", "uid": "u1"}}
    assert keys.key(g) == keys.key(json.loads(json.dumps(g)))
    assert keys.key(g) != keys.key({"metadata": {**g["metadata"], "uid": "u2"}})
    assert keys.key(g) != GroupKeys(b"n" * 32).key(g)


def test_configmap_is_signed_and_tamper_is_detected():
    group = {"metadata": {"name": "g", "namespace": "ns", "uid": "u"}}
    task = _ftt()
    cm = resources.configmap_manifest(group, [task], KEY, 3)
    text = cm["data"]["tasks.yaml"]
    assert resources.configmap_current(group, cm, text, KEY)
    assert not resources.configmap_current(group, {"data": {**cm["data"], "tasks.yaml": text + "#"}}, text + "#", KEY)
    assert resources.next_revision(cm, 0) == 4 and resources.next_revision(None, 10**12) == 10**12


# --------------------------------------------------------------------------- poller

def _group(name="g", ns="ns", members=("ns/a",), uid="gu"):
    return {"metadata": {"name": name, "namespace": ns, "uid": uid},
            "spec": {"tasks": [{"namespace": k.split("/")[0], "name": k.split("/")[1], "uid": "u-" + k} for k in members]}}


def test_poller_accepts_only_signed_reports_for_members():
    cfg = OperatorConfig(unreachable_after=2)
    keys = GroupKeys(b"m" * 32)
    p = EnginePoller(cfg, keys.key)
    g = _group()
    key = keys.key(g)
    rep = {"tasks": {"ns/a": {"phase": "Running", "step": 2}, "other/x": {"phase": "Succeeded", "step": 999},
                     "ns/b": {"phase": "Succeeded", "step": 999}}}
    # forged (unsigned, or signed with another group's key): nothing accepted
    assert p._accept(("ns", "g"), g, rep)[1].startswith("report refused")
    assert p._accept(("ns", "g"), g, trust.sign_report(keys.key(_group(uid="other")), "g", rep))[1]
    assert p.reports == {}
    changed, err = p._accept(("ns", "g"), g, trust.sign_report(key, "g", rep, now=10.0))
    assert changed and not err
    assert set(p.reports) == {"ns/a"}, "reports for tasks that are not members are dropped"
    # replay of an older signed report
    assert "replay" in p._accept(("ns", "g"), g, trust.sign_report(key, "g", rep, now=5.0))[1]
    # uid mismatch (a re-created namesake): dropped
    p2 = EnginePoller(cfg, keys.key)
    p2._accept(("ns", "g"), g, trust.sign_report(key, "g", {"tasks": {"ns/a": {"phase": "Running", "uid": "old"}}}))
    assert p2.reports == {}


def test_poller_marks_unreachable_after_n_failures_and_recovers():
    cfg = OperatorConfig(unreachable_after=3)
    p = EnginePoller(cfg, lambda g: KEY)
    gk = ("ns", "g")
    assert [p._fail(gk, "refused") for _ in range(3)] == [False, False, True]
    r = p.unreachable(gk)
    assert r and r.since and r.error == "refused"
    p._accept(gk, _group(), trust.sign_report(KEY, "g", {"tasks": {}}))
    assert p.unreachable(gk) is None


def test_endpoint_annotation_only_with_dev_flag():
    pod = {"annotations": {"muxtune.io/engine-endpoint": "http://127.0.0.1:19406/internal/admin?x="},
           "phase": "Running", "podIP": "10.0.0.7", "nodeName": "n"}
    assert EnginePoller(OperatorConfig(), lambda g: KEY).endpoint_of(pod, {}) == "http://10.0.0.7:9400"
    assert EnginePoller(OperatorConfig(poll_pod_ip=False), lambda g: KEY).endpoint_of(pod, {}) is None
    dev = EnginePoller(OperatorConfig(dev_endpoint_annotation=True), lambda g: KEY)
    assert dev.endpoint_of(pod, {}).startswith("http://127.0.0.1:19406")


# --------------------------------------------------------------------------- BaseModel policy

def _req(ns="team-a", base="model:llama", share=False):
    return TaskRequest(namespace=ns, name="t", base_model=base, share=share)


def test_basemodel_namespaces_policy():
    pcfg = PlannerConfig(shared_namespace="mux-system")
    private = {"spec": {"source": {"hostPath": {"path": "/w/b"}}, "allowedNamespaces": ["team-b"]}}
    everyone = {"spec": {"source": {"hostPath": {"path": "/w"}}, "allowedNamespaces": ["*"]}}
    unset = {"spec": {"source": {"hostPath": {"path": "/w"}}}}
    labelled = {"spec": {"source": {"builtin": "tiny-llama"},
                         "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["ml"]}]}}}
    bms = {"llama": private, "open": everyone, "unset": unset, "lab": labelled}
    r = policy.refusal(_req(), bms, {}, pcfg)
    assert r.reason == "ModelNotAllowed" and "team-a" in r.message and not r.final
    assert policy.refusal(_req(ns="team-b"), bms, {}, pcfg) is None
    assert policy.refusal(_req(base="model:open"), bms, {}, pcfg) is None
    assert policy.refusal(_req(base="model:unset"), bms, {}, pcfg).reason == "ModelNotAllowed"  # fail closed
    assert policy.refusal(_req(base="model:lab"), bms, {"team-a": {"team": "ml"}}, pcfg) is None
    assert policy.refusal(_req(base="model:lab"), bms, {"team-a": {"team": "web"}}, pcfg).reason == "ModelNotAllowed"
    assert not policy.selector_matches({}, {"a": "b"}), "an empty selector admits nobody"
    d = policy.refusal(_req(base="/host/weights"), bms, {}, pcfg)
    assert d.reason == "UnsupportedBaseModel" and d.final
    pvc = {"spec": {"source": {"pvc": {"claimName": "w", "namespace": "team-a"}}, "allowedNamespaces": ["*"]}}
    assert policy.refusal(_req(base="model:p"), {"p": pvc}, {}, pcfg) is None
    assert policy.refusal(_req(ns="team-b", base="model:p"), {"p": pvc}, {}, pcfg).reason == "ModelNotMountable"
    shared = PlannerConfig(sharing_policy="always", shared_namespace="mux-system")
    assert policy.refusal(_req(base="model:p"), {"p": pvc}, {}, shared).reason == "ModelNotMountable"


# --------------------------------------------------------------------------- pods

def _ftt(ns="ns", name="a", **spec):
    base = {"baseModel": "model:llama", "dataset": {"path": "sets/a.jsonl"}, "training": {"maxSteps": 5, "learningRate": 1e-3}}
    base.update(spec)
    return FineTuneTask.model_validate({"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask",
                                        "metadata": {"name": name, "namespace": ns, "uid": "u"}, "spec": base})


def _gobj(ns="team-a", shared_ns=None):
    ann = {"muxtune.io/gpu-memory-mib": "81920"}
    if shared_ns:
        ann["muxtune.io/namespaces"] = ",".join(shared_ns)
    return {"metadata": {"name": "mt-x", "namespace": ns, "uid": "gid", "annotations": ann},
            "spec": {"baseModel": "builtin:tiny-llama", "gpusPerPod": 1, "parallelism": {"dp": 1, "tp": 1, "pp": 1}}}


def _mounts(pod):
    return {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}


def test_pod_mounts_only_its_namespaces_areas():
    cfg = OperatorConfig(data_pvc="datasets", output_host_path="/srv/out")
    pod = resources.pod_manifest(_gobj(), 0, cfg)
    m = _mounts(pod)
    assert m["/data/team-a"] == {"name": "data", "mountPath": "/data/team-a", "subPath": "team-a", "readOnly": True}
    assert m["/output/team-a"]["subPath"] == "team-a" and not m["/output/team-a"]["readOnly"]
    assert "/data" not in m, "never the whole data root"
    assert not any(p.startswith(("/data/", "/output/")) and "team-a" not in p for p in m)
    assert "emptyDir" in {v["name"]: v for v in pod["spec"]["volumes"]}["output-root"]
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--data-root") + 1] == "/data" and args[args.index("--metrics-host") + 1] == "0.0.0.0"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["MUXTUNE_GROUP_KEY_FILE"] == "/etc/muxtune/key/key" and env["MUXTUNE_GROUP"] == "mt-x"
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["group-key"]["secret"]["secretName"] == "mt-x-key-gid"

    shared = resources.pod_manifest(_gobj("mux-system", ["team-a", "team-b"]), 0, cfg)
    assert {p for p in _mounts(shared) if p.startswith(("/data/", "/output/"))} == {
        "/data/team-a", "/data/team-b", "/output/team-a", "/output/team-b"}
    per_ns = OperatorConfig(data_pvc_per_namespace="data", output_pvc_per_namespace="out")
    v = {x["name"]: x for x in resources.pod_manifest(_gobj(), 0, per_ns)["spec"]["volumes"]}
    assert v["data-0"]["persistentVolumeClaim"] == {"claimName": "data", "readOnly": True}
    v = {x["name"]: x for x in resources.pod_manifest(_gobj("mux-system", ["team-a", "team-b"]), 0, per_ns)["spec"]["volumes"]}
    assert [v["output-0"]["persistentVolumeClaim"]["claimName"], v["output-1"]["persistentVolumeClaim"]["claimName"]] == [
        "out-team-a", "out-team-b"]


def test_pod_controls():
    cfg = OperatorConfig(
        engine_tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        engine_node_selector={"pool": "gpu"}, engine_image_pull_secrets=["regcred"], engine_limits={"memory": "32Gi"},
        engine_image_pull_policy="Always", engine_service_account="eng",
        engine_affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        engine_priority_classes=[{"minPriority": 500, "className": "hi"}, {"minPriority": -1000, "className": "lo"}],
        output_pvc="outputs")
    spec = resources.pod_manifest(_gobj(), 0, cfg, priority=600)["spec"]
    c = spec["containers"][0]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"pool": "gpu"} and spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert c["imagePullPolicy"] == "Always" and c["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": "1"}
    assert spec["serviceAccountName"] == "eng" and spec["automountServiceAccountToken"] is False
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [e["key"] for e in terms[0]["matchExpressions"]] == ["zone", "nvidia.com/gpu.memory"]
    assert spec["priorityClassName"] == "hi"
    assert resources.pod_manifest(_gobj(), 0, cfg, priority=0)["spec"]["priorityClassName"] == "lo"
    assert "priorityClassName" not in resources.pod_manifest(_gobj(), 0, OperatorConfig(output_host_path="/srv/out"), priority=600)["spec"]
    pdb = resources.pdb_manifest(_gobj())
    assert pdb["spec"]["maxUnavailable"] == 0 and pdb["metadata"]["ownerReferences"][0]["uid"] == "gid"
    sa = resources.engine_service_account_manifest("team-a", "eng")
    assert sa["automountServiceAccountToken"] is False


def test_shared_group_only_takes_tasks_of_mounted_namespaces():
    from muxtune.operator.memory import Parallelism
    from muxtune.operator.planner import GroupState, NodeInfo, plan

    cfg = PlannerConfig(sharing_policy="always", shared_namespace="mux-system")
    g = GroupState("mt-s", "mux-system", "builtin:tiny-llama", None, Parallelism(), 81920, "H100",
                   members=(TaskRequest("team-a", "x", "builtin:tiny-llama"),), namespaces=frozenset({"team-a"}))
    nodes = [NodeInfo("n", 8, 7, 81920, "H100")]
    p = plan([TaskRequest("team-a", "y", "builtin:tiny-llama"), TaskRequest("team-c", "z", "builtin:tiny-llama")],
             [g], nodes, {}, cfg)
    assert p.placement_of("team-a/y").group == "mt-s"
    assert p.placement_of("team-c/z").group != "mt-s" and p.placement_of("team-c/z").new_group


# --------------------------------------------------------------------------- backoff and status

def test_pod_backoff_doubles_and_caps():
    b = PodBackoff(1.0, 5.0)
    delays = []
    for _ in range(5):
        r = b.failed(("ns", "g"), "exceeded quota")
        delays.append(round(r.next_at - time.monotonic()))
    assert delays == [1, 2, 4, 5, 5] and not b.ready(("ns", "g"))
    b.succeeded(("ns", "g"))
    assert b.ready(("ns", "g")) and b.refused(("ns", "g")) is None


def _view(**kw):
    return status.TaskView(generation=1, max_steps=10, situation="member", group="g", **kw)


def test_refused_unschedulable_and_unreachable_reach_the_task():
    s = status.compute_status(None, _view(pod_state="refused", pod_message="pods \"g-0\" is forbidden: exceeded quota"), NOW)
    run = {c["type"]: c for c in s["conditions"]}["Running"]
    assert s["phase"] == "Placed" and run["reason"] == "PodCreationRefused" and "exceeded quota" in s["message"]
    u = status.compute_status(None, _view(pod_state="unschedulable", pod_message="0/2 nodes: persistentvolumeclaim \"x\" not found"), NOW)
    assert {c["type"]: c for c in u["conditions"]}["Running"]["reason"] == "PodUnschedulable" and "not found" in u["message"]
    running = status.compute_status(None, _view(pod_state="running", report={"phase": "Running", "step": 3}), NOW)
    assert {c["type"]: c for c in running["conditions"]}["EngineReachable"]["status"] == "True"
    stale = status.compute_status(running, _view(pod_state="running", report={"phase": "Running", "step": 3},
                                                 unreachable_since="2025-01-01T00:03:00Z", unreachable_message="timeout"),
                                  "2025-01-01T00:05:00Z")
    er = {c["type"]: c for c in stale["conditions"]}["EngineReachable"]
    assert er["status"] == "False" and er["lastTransitionTime"] == "2025-01-01T00:03:00Z"
    assert stale["phase"] == "Running" and "since 2025-01-01T00:03:00Z" in stale["message"]
    assert ("Warning", "EngineUnreachable") == status.condition_events(running, stale)[0][:2]
    final = status.compute_status(None, status.TaskView(1, 10, "unplaceable", reason="UnsupportedBaseModel",
                                                        message="local directory", final=True), NOW)
    assert final["phase"] == "Failed"


def test_pod_waiting_and_unschedulable_from_pod_status():
    from muxtune.operator.world import compact_pod

    p = compact_pod({"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 node(s) had untolerated taint {gpu: busy}."}]}})
    assert "untolerated taint" in p["unschedulable"]
    w = compact_pod({"metadata": {"name": "p"}, "spec": {"nodeName": "n"}, "status": {"phase": "Pending", "containerStatuses": [
        {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]}})
    assert w["waiting"].startswith("ImagePullBackOff: Back-off")


# --------------------------------------------------------------------------- credentials

EXEC_SCRIPT = """\
#!{python}
import json, sys, datetime, pathlib
count = pathlib.Path({count!r})
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
exp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds={ttl})
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {{"token": "tok-%d" % n, "expirationTimestamp": exp.strftime("%Y-%m-%dT%H:%M:%SZ")}}}}))
"""


def write_exec_kubeconfig(path: Path, server: str, ca_pem: bytes | None, script: Path) -> None:
    import base64

    cluster = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    else:
        cluster["insecure-skip-tls-verify"] = True
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster}],
        "users": [{"name": "u", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(script),
                                                  "interactiveMode": "Never"}}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "ns1"}}]}))


def test_exec_plugin_token_is_used_and_refreshed_before_expiry(tmp_path, monkeypatch):
    from muxtune.operator.credentials import KubeCredentials

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    count = tmp_path / "count"
    script = tmp_path / "cred.py"
    # expires in 5 min + 2 s: the loader refreshes 5 minutes before expiry, so 2 s from now
    script.write_text(EXEC_SCRIPT.format(python=sys.executable, count=str(count), ttl=302))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    kc = tmp_path / "kubeconfig"
    write_exec_kubeconfig(kc, "https://127.0.0.1:6443", None, script)
    c = KubeCredentials(str(kc))
    assert c.token() == "tok-0" and c.namespace == "ns1" and c.server == "https://127.0.0.1:6443"
    time.sleep(2.5)
    assert c.token() == "tok-1", "an exec token is refreshed before it expires"
    c.close()
    assert not any((tmp_path / "tmp").iterdir())


def test_inline_client_key_leaves_no_file(tmp_path, monkeypatch):
    """Inline certificate data is read into memory; the loader's temp files are deleted at once."""
    import base64
    import tempfile

    from muxtune.operator.credentials import KubeCredentials

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    pem_key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    pem_crt = b"-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n"
    kc = tmp_path / "kubeconfig"
    kc.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443",
                                               "certificate-authority-data": base64.b64encode(pem_crt).decode()}}],
        "users": [{"name": "u", "user": {"client-certificate-data": base64.b64encode(pem_crt).decode(),
                                         "client-key-data": base64.b64encode(pem_key).decode()}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    c = KubeCredentials(str(kc))
    assert c.key_data == pem_key and c.cert_data == pem_crt and c.ca_data == pem_crt
    files = [p for p in tmp.rglob("*") if p.is_file()]
    assert files == [], f"credential files left behind: {files}"
    c.close()
    assert list(tmp.iterdir()) == []
