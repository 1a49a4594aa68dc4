"""Issue 9, tenant isolation, against a real API server (kwok GPU nodes, the operator as the chart's
namespaced ServiceAccount, WITHOUT the development endpoint flag): a hostile tenant with the
standard `edit` role cannot steer the operator, reach another tenant's areas, or use another
team's BaseModel; tenants' edit/view users get exactly the aggregated rights; refused pod
creation backs off with a reason on the task."""
from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
import yaml

from tests.helpers.cluster import apply, kjson, task_manifest, wait_for

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

OPERATOR_DEV_ENDPOINT = False  # as in production: annotations never redirect polls


@pytest.fixture
def hostile():
    """Counts the hostile inputs this test tries (reported at its end); each test counts its own."""
    tried = {"inputs": 0}
    yield tried
    print(f"hostile inputs tried: {tried['inputs']}")


def ftt(info, ns, name):
    return kjson(info, "get", "finetunetask", name, "-n", ns)


def status_of(info, ns, name):
    return ftt(info, ns, name).get("status") or {}


def cond(st, type_):
    return {c["type"]: c for c in st.get("conditions") or []}.get(type_, {})


def group_pod(info, ns, group):
    pods = kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={group}")["items"]
    return pods[0] if pods else None


def bind(info, ns, user, role):
    info.kubectl("create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}", f"--user={user}", "-n", ns)


def as_user(info, user, *args, **kw):
    return info.kubectl(*args, "--as", user, check=False, **kw)


class Recorder(http.server.ThreadingHTTPServer):
    """A 'tenant admin endpoint' that records every request and answers a forged report."""

    def __init__(self, forged: dict):
        self.requests: list[str] = []
        rec = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                rec.requests.append(self.path)
                body = json.dumps(forged).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_tenant_roles_and_operator_rights(operator_env, hostile):
    """Real users bound to the standard edit/view roles (impersonated): edit may manage FineTuneTasks
    and only read BackboneGroups; view only reads; nobody but the operator writes status; the operator
    (namespaced Roles) cannot create pods outside its namespaces."""
    info, a, b, system = operator_env["info"], operator_env["a"], operator_env["b"], operator_env["system"]
    bind(info, a, "alice", "edit")
    bind(info, a, "victor", "view")

    def can(user, verb, res, ns, sub=None):
        args = ["auth", "can-i", verb, res, "-n", ns]
        if sub:
            args.append(f"--subresource={sub}")
        return as_user(info, user, *args).stdout.strip() == "yes"

    def wait_can(user, verb, res, ns):  # aggregation into edit/view is asynchronous
        wait_for(lambda: can(user, verb, res, ns), 30, what=f"{user} can {verb} {res}")

    wait_can("alice", "create", "finetunetasks.muxtune.io", a)
    wait_can("victor", "get", "finetunetasks.muxtune.io", a)
    assert can("alice", "delete", "finetunetasks.muxtune.io", a) and can("alice", "get", "backbonegroups.muxtune.io", a)
    for verb, res, sub in [("patch", "backbonegroups.muxtune.io", None), ("create", "backbonegroups.muxtune.io", None),
                           ("patch", "finetunetasks.muxtune.io", "status"), ("create", "basemodels.muxtune.io", None)]:
        assert not can("alice", verb, res, a, sub), f"edit may {verb} {res} {sub or ''}"
    assert not can("alice", "create", "finetunetasks.muxtune.io", b), "edit in team-a says nothing about team-b"
    assert not can("victor", "create", "finetunetasks.muxtune.io", a) and can("victor", "get", "backbonegroups.muxtune.io", a)

    sa = f"system:serviceaccount:{system}:mux-{system}-muxtune"
    for ns in ("kube-system", "default"):
        assert not can(sa, "create", "pods", ns), f"the operator may create pods in {ns}"
        assert not can(sa, "create", "secrets", ns)
    assert can(sa, "create", "pods", a) and not can(sa, "get", "secrets", a), "secrets: create only"

    # alice really creates a task through the API server, and the operator places it
    p = as_user(info, "alice", "apply", "-f", "-", input=yaml.safe_dump(task_manifest("by-alice", a)))
    assert p.returncode == 0, p.stderr
    wait_for(lambda: status_of(info, a, "by-alice").get("phase") == "Placed", 60, what="alice's task placed")
    # ... but cannot forge its status
    p = as_user(info, "alice", "patch", "ftt", "by-alice", "-n", a, "--subresource=status", "--type=merge",
                "-p", '{"status":{"phase":"Succeeded"}}')
    hostile["inputs"] += 1
    assert p.returncode != 0 and "forbidden" in p.stderr.lower()
    info.kubectl("delete", "ftt", "by-alice", "-n", a)


def test_annotation_cannot_redirect_polls_or_forge_reports(operator_env, hostile):
    """The issue's attack: an `edit` user points the operator at a URL of their choosing; the operator
    must neither call it nor believe it."""
    info, a = operator_env["info"], operator_env["a"]
    apply(info, task_manifest("steer", a, steps=1000))
    group = wait_for(lambda: status_of(info, a, "steer").get("group"), 60, what="placed")
    forged = {"tasks": {f"{a}/steer": {"phase": "Succeeded", "step": 999, "totalSteps": 1000, "loss": 0.01}}}
    srv = Recorder(forged)
    try:
        pod = wait_for(lambda: group_pod(info, a, group), 30, what="pod")
        ep = f"http://127.0.0.1:{srv.server_address[1]}/internal/admin?x="
        p = as_user(info, "alice", "annotate", "pod", pod["metadata"]["name"], "-n", a,
                    f"muxtune.io/engine-endpoint={ep}", "--overwrite")
        hostile["inputs"] += 1
        assert p.returncode == 0, p.stderr  # edit may annotate pods: the operator must not care
        # the tenant also rewrites the group's ConfigMap to train something else
        cm = f"{group}-tasks"
        p = as_user(info, "alice", "patch", "configmap", cm, "-n", a, "--type=merge",
                    "-p", json.dumps({"data": {"tasks.yaml": "kind: FineTuneTask\n"}}))
        hostile["inputs"] += 1
        assert p.returncode == 0, p.stderr

        def restored():
            d = kjson(info, "get", "configmap", cm, "-n", a)["data"]
            return "steer" in d["tasks.yaml"]

        wait_for(restored, 30, what="the operator restores (and re-signs) its ConfigMap")
        time.sleep(4)  # several poll intervals (1 s)
        assert srv.requests == [], f"the operator called the tenant's URL: {srv.requests}"
        st = status_of(info, a, "steer")
        assert st.get("phase") != "Succeeded" and st.get("step", 0) != 999, st
    finally:
        srv.shutdown()
        info.kubectl("delete", "ftt", "steer", "-n", a)


def test_paths_and_mounts_stay_in_the_tenants_area(operator_env, hostile):
    """Dataset paths naming another tenant resolve inside the task's own area; pods mount only their
    namespaces' areas; a shared group mounts exactly its members' namespaces and takes no task of
    another namespace later."""
    info, a, b, system = operator_env["info"], operator_env["a"], operator_env["b"], operator_env["system"]
    apply(info, task_manifest("peek", a, data=f"{b}/private.jsonl"))
    hostile["inputs"] += 1
    group = wait_for(lambda: status_of(info, a, "peek").get("group"), 60, what="placed")
    cm = kjson(info, "get", "configmap", f"{group}-tasks", "-n", a)
    (doc,) = [d for d in yaml.safe_load_all(cm["data"]["tasks.yaml"]) if d]
    assert doc["spec"]["dataset"]["path"] == f"{a}/{b}/private.jsonl"  # inside team-a's own area
    pod = wait_for(lambda: group_pod(info, a, group), 30, what="pod")
    mounts = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["mountPath"].startswith(("/data", "/output/"))]
    assert sorted(m["mountPath"] for m in mounts) == [f"/data/{a}", f"/output/{a}"]
    assert all(m.get("subPath") == a for m in mounts)
    cross_tenant = [m for m in mounts if b in m["mountPath"] or m.get("subPath") == b]
    assert cross_tenant == [], f"team-a's pod mounts team-b's area: {cross_tenant}"
    info.kubectl("delete", "ftt", "peek", "-n", a)

    # the API server refuses paths that leave the task's area, whatever exists there
    for field, value in (("dataset", {"path": f"../data/{b}/private.jsonl"}), ("output", {"path": f"/output/{b}/x"}),
                         ("output", {"path": f"/output/{b}/does-not-exist"}), ("dataset", {"path": f"/data/{b}/private.jsonl"})):
        doc = task_manifest("escape", a)
        doc["spec"][field] = {**doc["spec"].get(field, {}), **value}
        p = info.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc), check=False)
        hostile["inputs"] += 1
        assert p.returncode != 0 and f"spec.{field}.path" in p.stderr, p.stderr
        assert b not in p.stderr.replace(value["path"], ""), "the refusal must not depend on the other tenant's files"

    # shared across namespaces (opt-in): the group mounts exactly its members' namespaces
    apply(info, task_manifest("sh-a", a, share=True), task_manifest("sh-b", b, share=True))
    ga = wait_for(lambda: status_of(info, a, "sh-a").get("group"), 60, what="sh-a placed")
    gb = wait_for(lambda: status_of(info, b, "sh-b").get("group"), 60, what="sh-b placed")
    assert ga == gb
    pod = wait_for(lambda: group_pod(info, system, ga), 30, what="shared pod")
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert {m for m in mounts if m.startswith(("/data", "/output/"))} == {f"/data/{a}", f"/data/{b}", f"/output/{a}", f"/output/{b}"}
    g = kjson(info, "get", "backbonegroup", ga, "-n", system)
    assert g["metadata"]["annotations"]["muxtune.io/namespaces"] == ",".join(sorted([a, b]))
    info.kubectl("delete", "ftt", "sh-a", "sh-b", "-n", a, "--ignore-not-found")
    info.kubectl("delete", "ftt", "sh-b", "-n", b)


def test_basemodel_namespaces_and_sources(operator_env, hostile):
    info, a, b = operator_env["info"], operator_env["a"], operator_env["b"]
    tag = a.rsplit("-", 1)[-1]
    private = {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": f"private-{tag}"},
               "spec": {"source": {"hostPath": {"path": "/models/team-b-private"}}, "allowedNamespaces": [b],
                        "architecture": {"parameters": 1_000_000, "layers": 4, "hiddenSize": 128, "numAttentionHeads": 4}}}
    builtin = {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": f"tiny-{tag}"},
               "spec": {"source": {"builtin": "tiny-llama"}, "allowedNamespaces": ["*"]}}
    elsewhere = {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": f"claim-{tag}"},
                 "spec": {"source": {"pvc": {"claimName": "weights", "namespace": b}}, "allowedNamespaces": ["*"],
                          "architecture": {"parameters": 1_000_000, "layers": 4, "hiddenSize": 128}}}
    apply(info, private, builtin, elsewhere)
    apply(info, task_manifest("steal", a, base=f"model:private-{tag}"),
          task_manifest("own", b, base=f"model:private-{tag}"),
          task_manifest("bi", a, base=f"model:tiny-{tag}"),
          task_manifest("far", a, base=f"model:claim-{tag}"),
          task_manifest("dir", a, base="/var/lib/weights"))
    hostile["inputs"] += 2

    def placed_reason(ns, name):
        st = status_of(info, ns, name)
        return st.get("phase"), cond(st, "Placed").get("reason")

    wait_for(lambda: placed_reason(a, "steal") == ("Pending", "ModelNotAllowed"), 60, what="steal refused")
    wait_for(lambda: placed_reason(a, "far") == ("Pending", "ModelNotMountable"), 60, what="far refused")
    wait_for(lambda: status_of(info, a, "dir").get("phase") == "Failed", 60, what="dir refused")
    assert "UnsupportedBaseModel" in json.dumps(status_of(info, a, "dir")["conditions"])
    st = status_of(info, a, "steal")
    assert a in st["message"] and "allowedNamespaces" in st["message"]
    events = kjson(info, "get", "events", "-n", a, "--field-selector", "involvedObject.name=steal")["items"]
    assert any(e["type"] == "Warning" and e["reason"] == "ModelNotAllowed" for e in events)
    wait_for(lambda: status_of(info, b, "own").get("phase") == "Placed", 60, what="owner's task placed")
    assert not status_of(info, a, "steal").get("group")
    # a builtin BaseModel is placed and the engine is told to build it (no volume, no missing path)
    gbi = wait_for(lambda: status_of(info, a, "bi").get("group"), 60, what="builtin BaseModel placed")
    cm = kjson(info, "get", "configmap", f"{gbi}-tasks", "-n", a)
    assert [d["spec"]["baseModel"] for d in yaml.safe_load_all(cm["data"]["tasks.yaml"]) if d] == ["builtin:tiny-llama"]
    info.kubectl("delete", "ftt", "steal", "bi", "far", "dir", "-n", a)
    info.kubectl("delete", "ftt", "own", "-n", b)
    info.kubectl("delete", "basemodel", f"private-{tag}", f"tiny-{tag}", f"claim-{tag}")


def test_refused_pod_creation_backs_off_with_a_reason(operator_env):
    """A ResourceQuota refuses the group's pod: the task says so (the API server's message), a
    Warning event is posted, and the operator retries with exponential backoff, one log line per
    attempt and no traceback."""
    info, b, op = operator_env["info"], operator_env["b"], operator_env["op"]
    info.kubectl("create", "quota", "no-gpus", "--hard=requests.nvidia.com/gpu=0", "-n", b)
    try:
        before = op.metric("muxtune_operator_api_requests_total", verb="POST", resource="pods")
        apply(info, task_manifest("quota", b))
        t0 = time.monotonic()

        def refused():
            st = status_of(info, b, "quota")
            return cond(st, "Running").get("reason") == "PodCreationRefused" and st

        st = wait_for(refused, 60, what="PodCreationRefused on the task")
        assert "exceeded quota" in st["message"], st["message"]
        time.sleep(max(0.0, 12 - (time.monotonic() - t0)))
        attempts = op.metric("muxtune_operator_api_requests_total", verb="POST", resource="pods") - before
        # backoff 2, 4, 8 s: about 3 attempts in 12 s (without backoff: ~3 per second, 36)
        assert 1 <= attempts <= 6, attempts
        events = kjson(info, "get", "events", "-n", b, "--field-selector", "involvedObject.name=quota")["items"]
        assert any(e["type"] == "Warning" and e["reason"] == "PodCreationRefused" and "quota" in e["message"] for e in events)
        log = op.log_text()
        assert "pod creation refused" in log and "Traceback" not in log
    finally:
        info.kubectl("delete", "quota", "no-gpus", "-n", b)
    group = status_of(info, b, "quota")["group"]
    wait_for(lambda: group_pod(info, b, group), 60, what="the pod once the quota is gone")
    wait_for(lambda: cond(status_of(info, b, "quota"), "Running").get("reason") != "PodCreationRefused", 30,
             what="the refusal cleared")
    info.kubectl("delete", "ftt", "quota", "-n", b)
