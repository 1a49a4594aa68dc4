"""Several pods per group, without a cluster: the pods' torchrun environment, Kueue's pod-group
metadata, the gang decisions (admit whole, restart whole), the planner's queues, task status."""
from __future__ import annotations

import pytest

from muxtune.operator import gang, resources, status
from muxtune.operator import planner as P
from muxtune.operator.config import OperatorConfig
from muxtune.operator.memory import Parallelism, TaskShape

NOW = "2025-01-01T00:00:00Z"


def group(dp=2, tp=1, pp=1, queue=""):
    gp = P.GroupPlan("mt-g", "ns", "builtin:tiny-llama", "ns", Parallelism(dp=dp, tp=tp, pp=pp), "H100", 81920,
                     ("ns/a",), 1, True, True, queue=queue)
    m = resources.group_manifest(gp, [{"metadata": {"name": "a", "namespace": "ns", "uid": "u"}}], 4096)
    m["metadata"]["uid"] = "group-uid"
    return m


def env_of(pod):
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_a_two_pod_group_is_one_torchrun_world():
    g, cfg = group(dp=2, tp=2, pp=2), OperatorConfig(output_host_path="/srv/out")
    pods = [resources.pod_manifest(g, r, cfg) for r in range(2)]
    for rank, pod in enumerate(pods):
        c = pod["spec"]["containers"][0]
        assert pod["metadata"]["name"] == f"mt-g-{rank}" and pod["spec"]["hostname"] == f"mt-g-{rank}"
        assert pod["spec"]["subdomain"] == "mt-g"  # the headless Service: stable DNS names
        assert c["command"] + c["args"][:2] == ["muxtune", "run", "/etc/muxtune/tasks/tasks.yaml"]
        assert c["args"][-6:] == ["--dp", "2", "--tp", "2", "--pp", "2"]
        env = env_of(pod)
        assert {k: env[k] for k in env if k.startswith("PET_")} == {
            "PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": "mt-g-0.mt-g.ns.svc", "PET_MASTER_PORT": "29500"}
        assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK"} & set(env)  # else a worker, not a launcher
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "4"
        assert pod["spec"]["restartPolicy"] == "Never"  # a failed rank fails the pod; the group restarts whole
        assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in c["ports"]
        assert env["MUXTUNE_GROUP_KEY_FILE"] == "/etc/muxtune/key/key"
    # the same key Secret for every pod of the group; only global rank 0 serves /healthz
    keys = [{v["name"]: v for v in p["spec"]["volumes"]}["group-key"]["secret"]["secretName"] for p in pods]
    assert keys[0] == keys[1]
    assert "readinessProbe" in pods[0]["spec"]["containers"][0] and "readinessProbe" not in pods[1]["spec"]["containers"][0]


def test_only_the_groups_own_pods_reach_its_rendezvous_ports():
    from muxtune.operator import isolation

    g = group(dp=2)
    np_ = isolation.network_policy_manifest(g, OperatorConfig(), ["ns"])
    sel = {"matchLabels": {"muxtune.io/group": "mt-g", "app.kubernetes.io/component": "engine"}}
    assert np_["spec"]["podSelector"] == sel and np_["spec"]["policyTypes"] == ["Ingress"]
    assert np_["spec"]["ingress"][0] == {"from": [{"podSelector": sel}]}  # any port, the group's own pods only
    assert np_["metadata"]["ownerReferences"][0]["uid"] == "group-uid"
    pod = resources.pod_manifest(g, 1, OperatorConfig(output_host_path="/srv/out"))
    assert sel["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_one_pod_layouts():
    cfg = OperatorConfig(output_host_path="/srv/out")
    (single,) = [resources.pod_manifest(group(dp=1), 0, cfg)]
    assert "--dp" not in single["spec"]["containers"][0]["args"] and not any(k.startswith("PET_") for k in env_of(single))
    assert single["spec"]["restartPolicy"] == "OnFailure"
    piped = resources.pod_manifest(group(dp=1, pp=2), 0, cfg)
    env = env_of(piped)
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_MASTER_ADDR"]) == ("1", "2", "127.0.0.1")


def test_the_engine_launcher_reads_the_pod_environment_as_torchrun_would(monkeypatch):
    pytest.importorskip("torch")
    from muxtune.engine.parallel import ranks as launch
    pod = resources.pod_manifest(group(dp=2, tp=1, pp=2), 1, OperatorConfig(output_host_path="/srv/out"))
    for k in list(launch.os.environ):
        if k.startswith(("PET_", "TORCHELASTIC_")) or k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    for k, v in env_of(pod).items():
        if v is not None:
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch.must_launch(2, 1, 2)
    config = launch.launch_config(4)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 2)
    assert config.rdzv_backend == "static" and config.rdzv_endpoint == "mt-g-0.mt-g.ns.svc:29500"
    assert config.rdzv_configs.get("rank") == 1  # this pod's node rank


def test_kueue_pod_group_metadata_is_identical_on_every_pod():
    from muxtune.devcluster import kueue_objects as ko
    from muxtune.operator import config as C

    assert (C.KUEUE_QUEUE_LABEL, C.KUEUE_POD_GROUP_LABEL, C.KUEUE_TOTAL_COUNT_ANNOTATION, C.KUEUE_ADMISSION_GATE) == (
        ko.QUEUE_NAME_LABEL, ko.POD_GROUP_NAME_LABEL, ko.POD_GROUP_TOTAL_COUNT_ANNOTATION, ko.ADMISSION_GATE)
    assert C.KUEUE_API == ko.API_VERSION
    g = group(dp=2, queue="lq")
    pods = [resources.pod_manifest(g, r, OperatorConfig(output_host_path="/srv/out")) for r in range(2)]
    want = ko.pod_group_metadata("lq", "mt-g", 2)
    for p in pods:
        assert want["labels"].items() <= p["metadata"]["labels"].items()
        assert want["annotations"].items() <= p["metadata"]["annotations"].items()

    # Kueue splits pods into pod sets by these spec fields (pkg/util/pod GenerateRoleHash): one set
    def shape(p):
        s = p["spec"]
        return ([{"requests": c["resources"]["requests"], "ports": c["ports"]} for c in s["containers"]],
                s.get("nodeSelector"), s.get("affinity"), s.get("tolerations"), s.get("priorityClassName"))

    assert shape(pods[0]) == shape(pods[1])
    assert not any("kueue" in k for k in resources.pod_manifest(group(dp=2), 0, OperatorConfig(output_host_path="/srv/out"))["metadata"]["labels"])


def pod(name, phase="Running", node="n1", deleting=False, gated=False, message=""):
    return {"name": name, "namespace": "ns", "phase": phase, "nodeName": node, "deleting": deleting,
            "gated": gated, "message": message, "labels": {}, "metadata": {"name": name, "resourceVersion": "1"}}


NAMES = ["mt-g-0", "mt-g-1"]


def decide(pods, g=None, fits=(True, ""), queued=False, refused=False, now=1000.0, max_restarts=3):
    return gang.decide(pods, NAMES, g or group(), now=now, max_restarts=max_restarts, backoff_base=2, backoff_cap=60,
                       creation_refused=refused, queued=queued, fits=lambda: fits)


def test_gang_creates_all_pods_only_when_all_fit():
    assert decide([]) == gang.Decision(gang.CREATE, (0, 1))
    wait = decide([], fits=(False, "only one fits"))
    assert (wait.action, wait.reason, wait.message, wait.ranks) == (gang.WAIT, "WaitingForGang", "only one fits", ())
    # with Kueue, all pods are created at once and Kueue admits them together: no inventory check
    assert decide([], fits=(False, "x"), queued=True) == gang.Decision(gang.CREATE, (0, 1))
    assert decide([pod("mt-g-0"), pod("mt-g-1")]).action == gang.STEADY
    # a gang that never started (the second create was refused) is completed, not restarted
    assert decide([pod("mt-g-0", phase="Pending", node=None)]) == gang.Decision(gang.CREATE, (1,))
    assert decide([pod("mt-g-0")], refused=True) == gang.Decision(gang.CREATE, (1,))


@pytest.mark.parametrize("pods,why", [
    ([pod("mt-g-0"), pod("mt-g-1", phase="Failed", message="OOMKilled")], "pod mt-g-1 failed: OOMKilled"),
    ([pod("mt-g-0"), pod("mt-g-1", phase="Succeeded")], "pod mt-g-1 exited"),
    ([pod("mt-g-0"), pod("mt-g-1", deleting=True)], "pod mt-g-1 was deleted"),
    ([pod("mt-g-0")], "1 of the group's 2 pods are gone"),
])
def test_a_lost_pod_restarts_the_whole_group(pods, why):
    d = decide(pods)
    assert (d.action, d.reason) == (gang.RESTART, "GroupRestarting") and d.message.startswith(why)
    assert "restart 1" in d.message


def test_restarts_are_counted_delayed_and_limited():
    g = group()
    g["metadata"]["annotations"].update(gang.restart_annotations(2, "pod mt-g-1 failed", 1000.0))
    assert gang.restarts_of(g) == (2, 1000.0, "pod mt-g-1 failed")
    # old pods still terminating: wait for their names to be free
    w = decide([pod("mt-g-0", deleting=True)], g)
    assert (w.action, w.reason) == (gang.WAIT, "GroupRestarting")
    # then recreate after base * 2^(restarts-1) = 4 s
    w = decide([], g, now=1001.0)
    assert (w.action, w.reason, w.retry_in) == (gang.WAIT, "GroupRestarting", 3.0)
    assert decide([], g, now=1005.0).action == gang.CREATE
    # the limit: the pods are left as they are and the tasks fail
    f = decide([pod("mt-g-0", phase="Failed")], g, max_restarts=2)
    assert f.action == gang.FAILED and "restarted 2 time(s)" in f.message


def test_capacity_places_every_pod_or_none():
    nodes = [P.NodeInfo("a", 8, 3, 81920, "H100"), P.NodeInfo("b", 8, 8, 81920, "H100"), P.NodeInfo("c", 8, 8, 40960, "A100")]
    cap = gang.Capacity(nodes)
    assert cap.place("H100", 81920, 2, 4) == ["b", "b"]  # two pods may share a node; best fit
    assert cap.place("H100", 81920, 3, 4) is None and cap.place("A100", 81920, 1, 1) is None
    cap.reserve_unbound("H100", 81920, 2)  # an unbound pod takes the fullest node that holds it
    assert cap.free == {"a": 1, "b": 8, "c": 8}
    where = cap.place("H100", 81920, 2, 4)
    cap.take(where, 4)
    assert cap.place("H100", 0, 1, 1) == ["a"] and cap.place("", 0, 1, 8) == ["c"]
    assert "b 0" in cap.why_not("H100", 81920, 2, 4)


def test_queued_tasks_keep_to_their_queue_and_namespace():
    def t(name, queue="", ns="a", share=False):
        return P.TaskRequest(ns, name, "builtin:tiny-llama", TaskShape(batch_size=1, max_seq_len=64), share=share,
                             uid=name, queue=queue)

    nodes = [P.NodeInfo("n", 8, 8, 81920, "H100")]
    plan = P.plan([t("x", "q1"), t("y", "q1"), t("z", "q2"), t("w")], [], nodes, {})
    by_queue = {g.queue: sorted(g.members) for g in plan.groups}
    assert by_queue == {"q1": ["a/x", "a/y"], "q2": ["a/z"], "": ["a/w"]}
    shared = P.plan([t("s", "q1", share=True), t("u", "", ns="b", share=True)], [], nodes, {},
                    P.PlannerConfig(sharing_policy="always"))
    assert {g.namespace for g in shared.groups if g.queue} == {"a"}  # a LocalQueue is namespaced
    ftt = {"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": "t", "namespace": "a"},
           "spec": {"baseModel": "builtin:tiny-llama", "dataset": {"path": "d.jsonl"}, "peft": {"r": 4},
                    "training": {"maxSteps": 1, "learningRate": 1e-3}}}
    from muxtune.api.finetunetask import FineTuneTask

    task = FineTuneTask.model_validate(ftt)
    assert P.TaskRequest.from_task(task, {"kueue.x-k8s.io/queue-name": "team"}).queue == "team"  # the namespace's
    ftt["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "own"}
    assert P.TaskRequest.from_task(FineTuneTask.model_validate(ftt), {"kueue.x-k8s.io/queue-name": "team"}).queue == "own"


@pytest.mark.parametrize("state,reason", [("gang", "WaitingForGang"), ("admission", "WaitingForAdmission"),
                                          ("restarting", "GroupRestarting")])
def test_task_status_shows_the_gang_state(state, reason):
    view = status.TaskView(1, 10, "member", group="mt-g", pod_state=state, pod_message="why")
    st = status.compute_status(None, view, NOW)
    run = {c["type"]: c for c in st["conditions"]}["Running"]
    assert (st["phase"], run["status"], run["reason"], st["message"]) == ("Placed", "False", reason, "why")


def test_a_gated_groups_tasks_say_they_wait_for_admission():
    """The controller's own view of a queued task whose group's pods Kueue still gates (this path once
    raised AttributeError: a local flag shadowed the kueue module)."""
    from muxtune.api.finetunetask import FineTuneTask
    from muxtune.operator.controller import Controller
    from muxtune.operator.groups import PodBackoff
    from muxtune.operator.poller import EnginePoller

    obj = {"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask",
           "metadata": {"name": "t", "namespace": "ns", "generation": 1, "labels": {"kueue.x-k8s.io/queue-name": "q"}},
           "spec": {"baseModel": "builtin:tiny-llama", "dataset": {"path": "d.jsonl"}, "peft": {"r": 4},
                    "training": {"maxSteps": 3, "learningRate": 1e-3}}}
    c = Controller.__new__(Controller)  # only what _task_view reads
    c.backoff, c.gang, c.workload_msgs = PodBackoff(1, 2), {}, {}
    c.poller = EnginePoller(OperatorConfig(), lambda g: b"k")
    gk = ("ns", "mt-g")
    pods = {gk: [{"name": f"mt-g-{r}", "deleting": False, "gated": True, "phase": "Pending"} for r in range(2)]}
    view = c._task_view("ns/t", obj, FineTuneTask.model_validate(obj), gk, None, pods)
    assert view.pod_state == "admission" and view.kueue is True and "Kueue" in view.pod_message
    st = status.compute_status(None, view, NOW)
    run = {c["type"]: c for c in st["conditions"]}["Running"]
    assert (st["phase"], run["reason"]) == ("Placed", "WaitingForAdmission")
    c.workload_msgs[gk] = "couldn't assign flavors: insufficient quota for nvidia.com/gpu"
    view = c._task_view("ns/t", obj, FineTuneTask.model_validate(obj), gk, None, pods)
    assert "insufficient quota" in view.pod_message
