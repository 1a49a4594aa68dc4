"""Who may read the engine's status port (engine/observe/status_server.py): with a token digest
configured (pods), /v1/status and /metrics answer only the status token; /healthz stays open for
probes; without one (a local `muxtune run`, bound to 127.0.0.1) the port is open as before.
Loopback only."""
from __future__ import annotations

import hashlib
import http.client

from muxtune.engine.observe.status_server import EngineServer
from muxtune.operator.keys import GroupKeys, status_token_sha256

STATUS_TOKEN = "operator-status-token-0123456789abcdef"
TENANT_TOKEN = GroupKeys(b"m" * 32).serving_token("team-a")  # a tenant's serving bearer token


def _server(token_sha256: str | None) -> EngineServer:
    return EngineServer("127.0.0.1", 0, lambda: {"tasks": {"team-a/t": {"loss": 1.0}}},
                        lambda: (b"muxtune_up 1\n", "text/plain"), token_sha256=token_sha256).start()


def _get(port: int, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, bytes, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        c.close()


def test_status_and_metrics_answer_only_the_status_token():
    server = _server(status_token_sha256(STATUS_TOKEN))
    refused = 0
    try:
        for path in ("/v1/status", "/metrics"):
            for method in ("GET", "HEAD"):
                for hdr in ({}, {"Authorization": f"Bearer {TENANT_TOKEN}"}, {"Authorization": "Bearer "},
                            {"Authorization": f"Basic {STATUS_TOKEN}"}, {"Authorization": STATUS_TOKEN},
                            {"Authorization": f"Bearer {STATUS_TOKEN}x"},
                            {"Authorization": f"Bearer {status_token_sha256(STATUS_TOKEN)}"}):  # the digest is no token
                    code, body, head = _get(server.port, path, hdr, method)
                    assert code == 401 and head.get("WWW-Authenticate") == "Bearer", (path, hdr, code)
                    assert b"loss" not in body and b"muxtune_up" not in body
                    refused += 1
            code, body, _ = _get(server.port, path, {"Authorization": f"Bearer {STATUS_TOKEN}"})
            assert code == 200 and (b"loss" in body or b"muxtune_up" in body)
            code, _, _ = _get(server.port, path, {"authorization": f"bearer  {STATUS_TOKEN}"})  # case of the scheme
            assert code == 200
        assert _get(server.port, "/healthz")[0] == 200  # probes carry no token
        assert _get(server.port, "/nope")[0] == 404
        # a refused request keeps the connection usable (keep-alive), as any other answer
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        c.request("GET", "/v1/status")
        r = c.getresponse()
        r.read()
        c.request("GET", "/v1/status", headers={"Authorization": f"Bearer {STATUS_TOKEN}"})
        assert (r.status, c.getresponse().status) == (401, 200)
        c.close()
    finally:
        server.stop()
    print(f"status requests tried without the status token: {refused}, answered: 0")


def test_without_a_token_the_port_is_open_for_local_use():
    server = _server(None)
    try:
        assert _get(server.port, "/v1/status")[0] == 200 and _get(server.port, "/metrics")[0] == 200
    finally:
        server.stop()


def test_the_operator_gives_engines_the_digest_and_polls_with_the_token():
    from muxtune.operator.config import OperatorConfig
    from muxtune.operator.podspec import engine_args

    args = engine_args(OperatorConfig(status_token=STATUS_TOKEN))
    digest = args[args.index("--status-token-sha256") + 1]
    assert digest == hashlib.sha256(STATUS_TOKEN.encode()).hexdigest() and STATUS_TOKEN not in " ".join(args)
    assert "--status-token-sha256" not in engine_args(OperatorConfig())


def test_the_operators_poll_carries_the_token_and_a_wrong_one_is_refused():
    """operator/poller.py against a real status server that wants the status token."""
    import asyncio

    from muxtune.facts import trust
    from muxtune.operator.config import LABEL_COMPONENT, OperatorConfig
    from muxtune.operator.poller import EnginePoller
    from muxtune.operator.podspec import pod_name

    keys = GroupKeys(b"m" * 32)
    group = {"metadata": {"name": "g", "namespace": "ns", "uid": "gu"},
             "spec": {"tasks": [{"namespace": "ns", "name": "a", "uid": "u"}]}}
    report = {"tasks": {"ns/a": {"phase": "Running", "step": 3}}}
    server = EngineServer("127.0.0.1", 0, lambda: trust.sign_report(keys.key(group), "g", report),
                          lambda: (b"", "text/plain"), token_sha256=status_token_sha256(STATUS_TOKEN)).start()
    pod = {"deleting": False, "labels": {LABEL_COMPONENT: "engine"}, "phase": "Running",
           "annotations": {"muxtune.io/engine-endpoint": f"http://127.0.0.1:{server.port}"}}
    try:
        def poll(token):
            p = EnginePoller(OperatorConfig(dev_endpoint_annotation=True, status_token=token, unreachable_after=1),
                             keys.key)
            asyncio.run(p.poll({("ns", "g"): group}, {("ns", pod_name("g", 0)): pod}, {}))
            return p

        assert poll(STATUS_TOKEN).reports["ns/a"]["step"] == 3
        for wrong in (TENANT_TOKEN, None):
            p = poll(wrong)
            assert p.reports == {} and p.unreachable(("ns", "g")).error == "HTTP 401"
    finally:
        server.stop()
