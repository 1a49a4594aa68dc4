"""Issue 9, faults and stale state, against a real API server: an engine that stops answering, a
report nobody signed, a pod the scheduler cannot place, two operator replicas (one of them logging
in through an exec credential plugin) with the leader killed, and no credential files left behind.

The engine here is a small signed HTTP stand-in (the real engine is in test_operator_e2e.py): it
lets the test stop it at will, which is the fault under test."""
from __future__ import annotations

import http.server
import json
import os
import stat
import sys
import threading
import time

import pytest

from muxtune.facts import trust

from tests.helpers.cluster import OperatorProcess, apply, kjson, task_manifest, wait_for

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

FAULTS = {"injected": 0}


def status_of(info, ns, name):
    return kjson(info, "get", "finetunetask", name, "-n", ns).get("status") or {}


def cond(st, type_):
    return {c["type"]: c for c in st.get("conditions") or []}.get(type_, {})


class Engine(http.server.ThreadingHTTPServer):
    """Serves /v1/status for one group, signed with ``key`` (None: unsigned, a forgery)."""

    def __init__(self, group: str, key: bytes | None, tasks: dict):
        self.tasks, self.hits = tasks, 0
        srv = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                srv.hits += 1
                payload = {"tasks": srv.tasks}
                if key is not None:
                    payload = trust.sign_report(key, group, payload)
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def placed_group(info, ns, name):
    return wait_for(lambda: status_of(info, ns, name).get("group"), 60, what=f"{name} placed")


def annotate(info, ns, group, url):
    pod = wait_for(lambda: kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={group}")["items"], 30,
                   what="pod")[0]
    info.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", ns, f"muxtune.io/engine-endpoint={url}", "--overwrite")


def test_engine_unreachable_and_forged_reports(operator_env):
    info, a, op = operator_env["info"], operator_env["a"], operator_env["op"]
    apply(info, task_manifest("live", a, steps=100))
    group = placed_group(info, a, "live")
    g = kjson(info, "get", "backbonegroup", group, "-n", a)
    # 1. an unsigned report (what the forged endpoint served) is not believed
    forged = Engine(group, None, {f"{a}/live": {"phase": "Succeeded", "step": 999, "totalSteps": 1000}})
    annotate(info, a, group, forged.url)
    wait_for(lambda: forged.hits >= 3, 30, what="polls of the forged endpoint")
    FAULTS["injected"] += 1
    st = status_of(info, a, "live")
    assert st["phase"] == "Placed" and st.get("step", 0) == 0, st
    assert "report refused" in op.log_text()
    wait_for(lambda: cond(status_of(info, a, "live"), "EngineReachable").get("status") == "False", 30,
             what="a forger counts as no engine")
    forged.shutdown()

    # 2. the group's own (signed) engine: Running at its step
    eng = Engine(group, op.group_key(g), {f"{a}/live": {"phase": "Running", "step": 7, "totalSteps": 100, "loss": 2.5}})
    annotate(info, a, group, eng.url)
    wait_for(lambda: status_of(info, a, "live").get("step") == 7, 30, what="signed report accepted")
    st = status_of(info, a, "live")
    assert st["phase"] == "Running" and cond(st, "EngineReachable").get("status") == "True"

    # 3. the engine goes away: after 3 failed polls the task says so, and since when
    eng.shutdown()
    eng.server_close()
    FAULTS["injected"] += 1
    t_stop = time.time()
    st = wait_for(lambda: (lambda s: cond(s, "EngineReachable").get("status") == "False" and s)(status_of(info, a, "live")),
                  60, what="EngineReachable=False")
    er = cond(st, "EngineReachable")
    assert er["reason"] == "EngineUnreachable" and "since" in st["message"]
    assert st["phase"] == "Running" and st["step"] == 7  # last known progress kept, marked stale
    events = kjson(info, "get", "events", "-n", a, "--field-selector", "involvedObject.name=live")["items"]
    assert any(e["type"] == "Warning" and e["reason"] == "EngineUnreachable" for e in events)
    import calendar

    since = calendar.timegm(time.strptime(er["lastTransitionTime"], "%Y-%m-%dT%H:%M:%SZ"))
    assert t_stop - 5 <= since <= time.time()  # the first failed poll, not the time of writing
    info.kubectl("delete", "ftt", "live", "-n", a)


def test_unschedulable_pod_reason_reaches_the_task(operator_env):
    """A BaseModel on a PVC that does not exist: the scheduler's message becomes the task's."""
    info, b = operator_env["info"], operator_env["b"]
    tag = b.rsplit("-", 1)[-1]
    bm = {"apiVersion": "muxtune.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": f"nopvc-{tag}"},
          "spec": {"source": {"pvc": {"claimName": "no-such-claim"}}, "allowedNamespaces": ["*"],
                   "architecture": {"parameters": 1_000_000, "layers": 4, "hiddenSize": 128}}}
    apply(info, bm, task_manifest("nopvc", b, base=f"model:nopvc-{tag}"))
    FAULTS["injected"] += 1

    def unschedulable():
        st = status_of(info, b, "nopvc")
        return cond(st, "Running").get("reason") == "PodUnschedulable" and st

    st = wait_for(unschedulable, 90, what="PodUnschedulable")
    assert "no-such-claim" in st["message"] and "not found" in st["message"], st["message"]
    info.kubectl("delete", "ftt", "nopvc", "-n", b)
    info.kubectl("delete", "basemodel", f"nopvc-{tag}")


EXEC = """\
#!{python}
import json, pathlib
count = pathlib.Path({count!r})
count.write_text(str(int(count.read_text()) + 1 if count.exists() else 1))
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {{"token": pathlib.Path({token!r}).read_text().strip()}}}}))
"""


def test_two_replicas_one_leader_exec_login_and_no_files_left(operator_env, tmp_path):
    """A second operator logs in through an exec credential plugin (an EKS/GKE-style kubeconfig that
    prints the ServiceAccount's token) with a private TMPDIR; while the first holds the Lease the
    second writes nothing; killing the first hands over; nothing is left in its TMPDIR."""
    info, a, system, op1 = operator_env["info"], operator_env["a"], operator_env["system"], operator_env["op"]
    from muxtune.devcluster import cluster

    sa = f"mux-{system}-muxtune"
    token = tmp_path / "token"
    token.write_text(info.kubectl("create", "token", sa, "-n", system, "--duration=2h").stdout.strip())
    count = tmp_path / "count"
    script = tmp_path / "exec-cred.py"
    script.write_text(EXEC.format(python=sys.executable, count=str(count), token=str(token)))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    kc = tmp_path / "exec.kubeconfig"
    import base64

    import yaml

    kc.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": info.server,
                                               "certificate-authority-data": base64.b64encode(info.ca_cert.read_bytes()).decode()}}],
        "users": [{"name": "u", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(script),
                                                  "interactiveMode": "Never"}}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": system}}]}))
    private_tmp = tmp_path / "optmp"
    private_tmp.mkdir()
    op2 = OperatorProcess(kc, op1.namespaces, system, tmp_path / "op2.log", signing_key=op1.signing_key,
                          status_token_file=op1.status_token_file,
                          env_extra={"TMPDIR": str(private_tmp)})
    op2.start()
    try:
        wait_for(lambda: "indices populated" in op2.log_text(), 60, what="second operator up")
        assert count.exists() and int(count.read_text()) >= 1, "the exec plugin was used"
        assert op2.metric("muxtune_operator_leader") == 0 and op1.metric("muxtune_operator_leader") == 1

        def writes(op):
            return sum(op.metric("muxtune_operator_api_requests_total", verb=v) for v in ("POST", "PATCH", "PUT", "DELETE")) \
                - sum(op.metric("muxtune_operator_api_requests_total", verb=v, resource="leases") for v in ("POST", "PUT"))

        base2 = writes(op2)
        apply(info, task_manifest("le-1", a))
        wait_for(lambda: status_of(info, a, "le-1").get("phase") == "Placed", 60, what="placed by the leader")
        time.sleep(2)
        assert writes(op2) == base2, "the follower wrote"
        assert [f for f in private_tmp.rglob("*") if f.is_file()] == [], "credential files while running"

        op1.kill()  # SIGKILL: no release, the Lease must expire (4 s in tests)
        FAULTS["injected"] += 1
        wait_for(lambda: op2.metric("muxtune_operator_leader") == 1, 60, what="the follower takes over")
        apply(info, task_manifest("le-2", a))
        wait_for(lambda: status_of(info, a, "le-2").get("phase") == "Placed", 60, what="placed by the new leader")
        assert writes(op2) > base2
        assert "Forbidden" not in op2.log_text() and "anonymous" not in op2.log_text()
    finally:
        op2.stop()
        op1.start()  # the module's operator, for the fixture's teardown
    assert list(private_tmp.iterdir()) == [], f"left in TMPDIR: {list(private_tmp.rglob('*'))}"
    info.kubectl("delete", "ftt", "le-1", "le-2", "-n", a)
    print(f"faults injected: {FAULTS['injected']}")
