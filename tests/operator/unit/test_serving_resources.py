"""Co-serving in the cluster, pure parts: a group serves when a member enables spec.serving (the
strictest SLOs of those that do; a group split over several ranks too, fronted by pod 0), its pods open the
API on port 8000 and serve only the members that enabled it, its Service names the port, and a
task's status.endpoint appears once its engine reports it answers for the adapter."""
from __future__ import annotations

from muxtune.api.backbonegroup import BackboneGroup
from muxtune.operator import resources, status
from muxtune.operator.config import OperatorConfig
from muxtune.operator.memory import Parallelism
from muxtune.operator.planner import GroupPlan

NOW = "2025-01-01T00:00:00Z"


def member(name, serving=None):
    spec = {"serving": serving} if serving is not None else {}
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}"}, "spec": spec}


def group(members, par=Parallelism()):
    gp = GroupPlan("mt-x", "ns", "builtin:tiny-llama", "ns", par, "H100", 81920,
                   tuple(f"ns/{m['metadata']['name']}" for m in members), 1, True, True)
    m = resources.group_manifest(gp, members)
    m["metadata"]["uid"] = "group-uid"
    return m


def test_group_serves_with_the_strictest_slos_of_its_serving_members():
    g = group([member("a", {"enabled": True, "sloTtftMs": 800, "sloTpotMs": 120}),
               member("b", {"enabled": True, "sloTtftMs": 2000, "sloTpotMs": 60}),
               member("c", {"enabled": False, "sloTtftMs": 10, "sloTpotMs": 1}), member("d")])
    assert g["spec"]["serving"] == {"port": 8000, "sloTtftMs": 800.0, "sloTpotMs": 60.0}
    BackboneGroup.model_validate(g)  # the CRD's schema
    assert "serving" not in group([member("c", {"enabled": False}), member("d")])["spec"]
    # a group split over ranks serves too (global rank 0 fronts the API)
    assert group([member("a", {"enabled": True})], Parallelism(tp=2))["spec"]["serving"]["port"] == 8000


def test_a_multi_pod_group_serves_from_pod_0_and_every_rank_gets_the_line():
    """dp=2 x tp=2: two pods; all ranks run the same command line (rank 0 serves, the others follow
    its decisions), only pod 0 opens the serving port, and the endpoint names pod 0."""
    from muxtune.operator.podspec import serving_endpoint

    g = group([member("a", {"enabled": True, "sloTtftMs": 500, "sloTpotMs": 50})], Parallelism(dp=2, tp=2))
    pods = [resources.pod_manifest(g, r, OperatorConfig(output_host_path="/srv/out"))["spec"] for r in (0, 1)]
    c0, c1 = (p["containers"][0] for p in pods)
    for c in (c0, c1):
        a = c["args"]
        assert a[a.index("--serve-port") + 1] == "8000" and a[a.index("--tp") + 1] == "2" and a[a.index("--dp") + 1] == "2"
    assert "serving" in [p["name"] for p in c0["ports"]] and "serving" not in [p["name"] for p in c1["ports"]]
    assert serving_endpoint("mt-x", "ns") == f"http://{pods[0]['hostname']}.{pods[0]['subdomain']}.ns.svc:8000/v1"


def test_serving_pod_opens_the_api_for_enabled_tasks_only():
    g = group([member("a", {"enabled": True, "sloTtftMs": 500, "sloTpotMs": 50})])
    c = resources.pod_manifest(g, 0, OperatorConfig(output_host_path="/srv/out"))["spec"]["containers"][0]
    args = c["args"]
    assert args[args.index("--serve-port") + 1] == "8000" and args[args.index("--serve-host") + 1] == "0.0.0.0"
    assert args[args.index("--serve-tasks") + 1] == "enabled"
    assert (args[args.index("--slo-ttft-ms") + 1], args[args.index("--slo-tpot-ms") + 1]) == ("500", "50")
    assert {"name": "serving", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    # requests are checked against the digests of the member namespaces' tokens (operator/isolation.py)
    assert args[args.index("--serve-tokens") + 1] == "/etc/muxtune/serving/tokens.json"
    assert {"name": "serving-tokens", "mountPath": "/etc/muxtune/serving", "readOnly": True} in c["volumeMounts"]
    plain = resources.pod_manifest(group([member("d")]), 0, OperatorConfig(output_host_path="/srv/out"))["spec"]["containers"][0]
    assert "--serve-port" not in plain["args"] and [p["name"] for p in plain["ports"]] == ["metrics"]
    # the engine's own CLI accepts what the operator writes
    from muxtune.cli import RunCommand

    fields, i = {"tasks": [args[1]]}, 2
    while i < len(args):
        flag = args[i][2:].replace("-", "_")
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            fields[flag], i = args[i + 1], i + 2
        else:
            fields[flag.removeprefix("no_")], i = not flag.startswith("no_"), i + 1
    cmd = RunCommand.model_validate(fields)
    assert (cmd.serve_port, cmd.serve_host, cmd.serve_tasks, cmd.slo_tpot_ms) == (8000, "0.0.0.0", "enabled", 50.0)


def test_service_names_the_serving_port():
    svc = resources.service_manifest(group([member("a", {"enabled": True})]), OperatorConfig())
    assert {"name": "serving", "port": 8000, "targetPort": 8000, "protocol": "TCP"} in svc["spec"]["ports"]


def test_endpoint_appears_when_the_engine_serves_the_adapter():
    ep = "http://mt-x.ns.svc:8000/v1"
    rep = {"phase": "Running", "step": 2, "totalSteps": 10}
    s = status.compute_status(None, status.TaskView(1, 10, "member", group="mt-x", pod_state="running", report=rep,
                                                    endpoint=ep), NOW)
    assert "endpoint" not in s  # the engine does not (yet) answer for it
    s = status.compute_status(s, status.TaskView(1, 10, "member", group="mt-x", pod_state="running",
                                                 report={**rep, "servedModel": "ns/a"}, endpoint=ep), NOW)
    assert s["endpoint"] == ep
    done = status.compute_status(s, status.TaskView(1, 10, "member", group="mt-x", pod_state="running",
                                                    report={**rep, "phase": "Succeeded", "servedModel": "ns/a"},
                                                    endpoint=ep), NOW)
    assert done["phase"] == "Succeeded" and done["endpoint"] == ep  # still served after training
