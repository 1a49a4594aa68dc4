"""charts/muxtune: lint and render clean, restricted pods, least-privilege RBAC, CRDs and dashboards
equal to the repository's, monitoring objects only where the API exists; installs into a real cluster."""
from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

from muxtune.api import crdgen

from tests.helpers.paths import REPO

pytest_plugins = ["muxtune.devcluster.fixture"]

CHART = REPO / "charts" / "muxtune"
MONITORING = ["--api-versions", "monitoring.coreos.com/v1"]
# output storage is required (values schema): the renders below name a claim per namespace
OUTPUT = ["--set", "engine.output.pvcPerNamespace=muxtune-output"]


def with_output(args) -> list[str]:
    return [*args] if any("engine.output." in a for a in args) else [*OUTPUT, *args]
ALL_MONITORING = [
    *MONITORING,
    "--set", "monitoring.serviceMonitor.enabled=true",
    "--set", "monitoring.podMonitor.enabled=true",
    "--set", "monitoring.prometheusRule.enabled=true",
    "--set", "monitoring.serviceMonitor.labels.release=kube-prometheus-stack",
    "--set", "monitoring.podMonitor.labels.release=kube-prometheus-stack",
    "--set", "monitoring.prometheusRule.labels.release=kube-prometheus-stack",
]


@pytest.fixture(scope="module")
def helm() -> Path:
    from muxtune.devcluster.build import ensure_binaries

    return ensure_binaries(["helm"])["helm"]


def run_helm(helm: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, env=env)
    if check:
        assert p.returncode == 0, f"helm {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p


def render(helm: Path, *args: str, chart: Path = CHART) -> list[dict]:
    p = run_helm(helm, "template", "mux", str(chart), "--namespace", "muxtune-system", *with_output(args))
    assert "WARNING" not in p.stderr.upper(), p.stderr
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def app_version() -> str:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


# ------------------------------------------------------------------------------------------ lint


@pytest.mark.parametrize("values", [[], ALL_MONITORING], ids=["default", "monitoring"])
def test_helm_lint_is_clean(helm, values):
    args = [a for a in values if a not in MONITORING]  # lint has no --api-versions
    p = run_helm(helm, "lint", "--strict", str(CHART), *with_output(args))
    assert "[WARNING]" not in p.stdout and "[ERROR]" not in p.stdout, p.stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in p.stdout


def test_default_render(helm):
    kinds = by_kind(render(helm))
    assert sorted(kinds) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Role", "RoleBinding",
                             "Secret", "Service", "ServiceAccount"]
    # the only ConfigMaps are the Grafana dashboards, one per file in dashboards/
    dashboards = sorted((CHART / "dashboards").glob("*.json"))
    assert len(kinds["ConfigMap"]) == len(dashboards) > 0
    assert all(cm["metadata"]["labels"].get("grafana_dashboard") == "1" for cm in kinds["ConfigMap"])
    (dep,) = kinds["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == f"ghcr.io/muxtune/operator:{app_version()}"
    assert c["command"] == ["muxtune", "operator"]
    assert f"--engine-image=ghcr.io/muxtune/engine:{app_version()}" in c["args"]
    assert "--metrics-port=8080" in c["args"] and "--engine-metrics-port=9400" in c["args"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"][0]["metadata"]["name"]
    (svc,) = kinds["Service"]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_chart_version_matches_the_package():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert app_version() == version


def test_restricted_security_context(helm):
    (dep,) = by_kind(render(helm))["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["runAsNonRoot"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert not sc.get("privileged")
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in v for v in pod.get("volumes", []))


# The operator's permissions, exactly: a change here must be deliberate.
EXPECTED_RULES = {
    ("muxtune.io", "finetunetasks"): {"get", "list", "watch", "patch"},
    ("muxtune.io", "finetunetasks/status"): {"get", "patch", "update"},
    ("muxtune.io", "backbonegroups"): {"get", "list", "watch", "create", "update", "patch", "delete"},
    ("muxtune.io", "backbonegroups/status"): {"get", "patch", "update"},
    ("muxtune.io", "basemodels"): {"get", "list", "watch"},
    ("muxtune.io", "basemodels/status"): {"get", "patch"},
    ("", "pods"): {"create", "get", "list", "watch", "patch", "update", "delete"},
    ("", "configmaps"): {"create", "get", "list", "watch", "patch", "update", "delete"},
    ("", "services"): {"create", "get", "list", "watch", "patch", "update", "delete"},
    ("", "secrets"): {"create"},  # a group's HMAC key: created, never read back
    ("", "serviceaccounts"): {"create"},  # the engines' binding-less ServiceAccount
    ("policy", "poddisruptionbudgets"): {"create"},
    ("kueue.x-k8s.io", "workloads"): {"get", "delete"},  # a queued group's Workload: why it waits; deleted first
    ("networking.k8s.io", "networkpolicies"): {"create", "patch"},  # every group (operator/isolation.py)
    ("", "resourcequotas"): {"list"},  # shared groups charged to member namespaces (operator/quota.py)
    ("kueue.x-k8s.io", "localqueues"): {"list"},  # ... and to their Kueue queues
    ("kueue.x-k8s.io", "clusterqueues"): {"list"},  # the queues' GPU quota (cluster-scoped)
    ("batch", "jobs"): {"create", "get", "list", "watch"},  # staging, export, model-cache Jobs (operator/transfers.py)
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("", "namespaces"): {"list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}


def _granted(role: dict) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), f"wildcard {field} in {rule}"
        assert not rule.get("nonResourceURLs") and not rule.get("resourceNames")
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                granted.setdefault((g, r), set()).update(rule["verbs"])
    return granted


CLUSTER_READS = {k for k in EXPECTED_RULES if k[1] in ("basemodels", "basemodels/status", "nodes", "namespaces",
                                                        "customresourcedefinitions", "clusterqueues")}
LEASES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def test_rbac_is_least_privilege(helm):
    kinds = by_kind(render(helm))
    roles = {r["metadata"]["name"]: r for r in kinds["ClusterRole"]}
    role = roles["mux-muxtune-operator"]
    assert _granted(role) == EXPECTED_RULES
    assert _granted(role)[("", "secrets")] == {"create"}, "the operator never reads Secrets"
    (binding,) = kinds["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (sa,) = kinds["ServiceAccount"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "muxtune-system"}]
    (leader,) = kinds["Role"]
    assert leader["metadata"]["namespace"] == "muxtune-system" and _granted(leader) == LEASES


def test_rbac_with_watch_namespaces_is_namespaced(helm):
    """With watchNamespaces the operator may write only there (and in the shared namespace): its
    ClusterRole keeps the cluster-scoped reads, everything else is a Role per namespace."""
    kinds = by_kind(render(helm, "--set", "operator.watchNamespaces={team-a,team-b}"))
    roles = {r["metadata"]["name"]: r for r in kinds["ClusterRole"]}
    cluster = _granted(roles["mux-muxtune-operator"])
    assert set(cluster) == CLUSTER_READS and not any(r in ("pods", "secrets", "configmaps") for _, r in cluster)
    by_ns = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in kinds["Role"]}
    for ns in ("team-a", "team-b", "muxtune-system"):
        assert _granted(by_ns[(ns, "mux-muxtune-operator")]) == {k: v for k, v in EXPECTED_RULES.items() if k not in CLUSTER_READS}
    assert {ns for ns, _ in by_ns} == {"team-a", "team-b", "muxtune-system"}
    bindings = {(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in kinds["RoleBinding"]}
    assert ("team-a", "mux-muxtune-operator") in bindings and ("kube-system", "mux-muxtune-operator") not in bindings


def test_tenant_roles_are_aggregated(helm):
    roles = {r["metadata"]["name"]: r for r in by_kind(render(helm))["ClusterRole"]}
    edit, view = roles["mux-muxtune-edit"], roles["mux-muxtune-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    e = _granted(edit)
    assert "create" in e[("muxtune.io", "finetunetasks")] and e[("muxtune.io", "backbonegroups")] == {"get", "list", "watch"}
    assert e[("muxtune.io", "finetunetasks/status")] == {"get", "list", "watch"}, "status is the operator's"
    assert all(v == {"get", "list", "watch"} for v in _granted(view).values())


def test_watch_namespaces_and_flags(helm):
    kinds = by_kind(render(helm, "--set", "operator.watchNamespaces={team-a,team-b}", "--set", "operator.sharingPolicy=never",
                           "--set", "engine.image.tag=dev", "--set", "operator.extraArgs={--dry-run}"))
    (c,) = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"]
    assert "--namespaces=team-a,team-b" in c["args"] and "--sharing-policy=never" in c["args"]
    assert "--engine-image=ghcr.io/muxtune/engine:dev" in c["args"] and c["args"][-1] == "--dry-run"


def test_operator_args_parse_as_the_operator_cli(helm):
    """The rendered flags are the ones `muxtune operator` (muxtune.operator.cli.OperatorCommand) takes."""
    from pydantic_settings import CliApp, CliSettingsSource

    from muxtune.operator.cli import OperatorCommand

    kinds = by_kind(render(helm, "--set", "operator.watchNamespaces={team-a,team-b}", "--set", "engine.data.pvc=train",
                           "--set", "engine.output.hostPath=/srv/out", "--set", "engine.output.pvcPerNamespace=out",
                           "--set", "engine.tolerations[0].key=gpu", "--set", "engine.tolerations[0].operator=Exists",
                           "--set", "engine.nodeSelector.pool=a100", "--set", "engine.imagePullSecrets={regcred}",
                           "--set", "engine.priorityClasses[0].minPriority=500",
                           "--set", "engine.priorityClasses[0].className=muxtune-high",
                           "--set", "engine.resources.limits.memory=32Gi", "--set", "engine.podDisruptionBudget=false",
                           "--set", "transfer.maxDatasetBytes=5000000000",
                           "--set", "engine.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight=1",
                           "--set", "engine.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference.matchExpressions[0].key=zone",
                           "--set", "engine.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference.matchExpressions[0].operator=Exists"))
    (c,) = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"]
    assert c["command"][-1] == "operator"
    source = CliSettingsSource(OperatorCommand, cli_kebab_case=True, cli_implicit_flags=True)
    cmd = CliApp.run(OperatorCommand, cli_args=c["args"], cli_settings_source=source, cli_cmd_method_name="to_config")
    cfg = cmd.to_config()
    assert cfg.namespaces == ["team-a", "team-b"] and cfg.shared_namespace == "muxtune-system"
    assert cfg.sharing_policy == "opt-in" and cfg.metrics_port == 8080 and cfg.engine_metrics_port == 9400
    assert cfg.engine_image == f"ghcr.io/muxtune/engine:{app_version()}"
    assert (cfg.engine_cpu_request, cfg.engine_memory_request) == ("2", "16Gi")
    assert (cfg.data_pvc, cfg.output_host_path, cfg.output_pvc_per_namespace) == ("train", "/srv/out", "out")
    assert cfg.engine_tolerations == [{"key": "gpu", "operator": "Exists"}] and cfg.engine_node_selector == {"pool": "a100"}
    assert cfg.engine_image_pull_secrets == ["regcred"] and cfg.engine_limits == {"memory": "32Gi"}
    assert cfg.engine_priority_classes == [{"minPriority": 500, "className": "muxtune-high"}] and cfg.engine_pdb is False
    assert cfg.engine_affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 1
    assert cfg.leader_elect and cfg.signing_key_file == "/etc/muxtune/signing/key" and not cfg.dev_endpoint_annotation
    assert cfg.status_token_file == "/etc/muxtune/status-token/token"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in kinds["Deployment"][0]["spec"]["template"]["spec"]["volumes"]}
    assert mounts["status-token"] == "/etc/muxtune/status-token" and vols["status-token"]["secret"]["secretName"] == "mux-muxtune-status-token"
    assert cmd.liveness_port == 8081 and cfg.max_dataset_bytes == 5_000_000_000  # not 5e+09
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and {"name": "health", "containerPort": 8081, "protocol": "TCP"} in c["ports"]


@pytest.mark.parametrize("bad,word", [
    ("operator.sharingPolicy=optin", "sharingPolicy"),
    ("replicaCount=3", "replicaCount"),
    ("engine.tolerration[0].key=x", "tolerration"),
    ("operatorr.metricsPort=1", "operatorr"),
    ("engine.data.pvcPerNamespce=x", "pvcPerNamespce"),
    ("monitoring.podMonitor.enabeld=true", "enabeld"),
    ("engine.priorityClasses[0].className=x", "minPriority"),
    ("rbac.aggregate=true", "aggregate"),
])
def test_values_schema_refuses_typos_and_unknown_keys(helm, bad, word):
    p = run_helm(helm, "template", "mux", str(CHART), *OUTPUT, "--set", bad, check=False)
    assert p.returncode != 0 and word in p.stderr, p.stderr
    p = run_helm(helm, "lint", "--strict", str(CHART), *OUTPUT, "--set", bad, check=False)
    assert p.returncode != 0


def test_two_replicas_with_leader_election(helm):
    (dep,) = by_kind(render(helm, "--set", "replicaCount=2"))["Deployment"]
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--leader-elect" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_liveness_probe_can_be_turned_off(helm):
    (dep,) = by_kind(render(helm, "--set", "operator.livenessPort=null"))["Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "livenessProbe" not in c and not any(a.startswith("--liveness-port") for a in c["args"])


# ------------------------------------------------------------------------------------ monitoring


def test_monitoring_needs_the_api(helm):
    without_api = [a for a in ALL_MONITORING if a not in MONITORING]
    kinds = by_kind(render(helm, *without_api))
    assert not {"PodMonitor", "ServiceMonitor", "PrometheusRule"} & kinds.keys()


def test_monitoring_objects(helm):
    kinds = by_kind(render(helm, *ALL_MONITORING))
    (sm,) = kinds["ServiceMonitor"]
    (svc,) = kinds["Service"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    (pm,) = kinds["PodMonitor"]
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "metrics"
    # per-task series keep the task's namespace; the group comes from the engine pod's label
    assert ep["honorLabels"] is True and sm["spec"]["endpoints"][0]["honorLabels"] is True
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_muxtune_io_group"], "targetLabel": "group"} in ep["relabelings"]
    assert pm["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "muxtune-engine"}}
    # engines answer /metrics only to the status token: Prometheus scrapes with the chart's Secret,
    # the one the operator mounts (same namespace as the PodMonitor, as the Prometheus Operator needs)
    assert ep["authorization"] == {"type": "Bearer", "credentials": {"name": "mux-muxtune-status-token", "key": "token"}}
    (tok,) = [s for s in kinds["Secret"] if s["metadata"]["name"] == "mux-muxtune-status-token"]
    assert tok["metadata"]["namespace"] == pm["metadata"]["namespace"] and len(tok["data"]["token"]) >= 48


@pytest.fixture
def chart_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "muxtune"
    shutil.copytree(CHART, dest)
    return dest


def test_prometheus_rule_comes_from_alerts_file(helm, chart_copy):
    assert "PrometheusRule" not in by_kind(render(helm, *ALL_MONITORING, chart=chart_copy)) or yaml.safe_load(
        (CHART / "files" / "alerts.yaml").read_text()
    ).get("groups")
    rules = {
        "groups": [{
            "name": "muxtune-test",
            "rules": [{
                "alert": "MuxtuneTaskStalled",
                "expr": 'rate(muxtune_task_steps_total[10m]) == 0',
                "for": "15m",
                "labels": {"severity": "warning"},
                "annotations": {"summary": "Task {{ $labels.namespace }}/{{ $labels.task }} made no progress"},
            }],
        }]
    }
    (chart_copy / "files" / "alerts.yaml").write_text(yaml.safe_dump(rules))
    (pr,) = by_kind(render(helm, *ALL_MONITORING, chart=chart_copy))["PrometheusRule"]
    assert pr["spec"] == rules  # Prometheus templating passes through untouched
    assert pr["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_alerts_file_is_a_rule_file():
    doc = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("groups"), list)


# -------------------------------------------------------------------------- CRDs and dashboards


def test_chart_crds_equal_generated_crds():
    stale = crdgen.diff_files(CHART / "crds")
    assert not stale, f"charts/muxtune/crds is out of date ({stale}): run `muxtune crds`"


def test_chart_dashboards_equal_repository_dashboards():
    """Helm reads only files inside the chart: charts/muxtune/dashboards is a copy of dashboards/."""
    top = {p.name: p.read_bytes() for p in (REPO / "dashboards").glob("*.json")}
    chart = {p.name: p.read_bytes() for p in (CHART / "dashboards").glob("*.json")}
    assert sorted(chart) == sorted(top), "run: cp dashboards/*.json charts/muxtune/dashboards/ (and remove stale copies)"
    for name in top:
        assert chart[name] == top[name], f"charts/muxtune/dashboards/{name} differs from dashboards/{name}: copy it again"


def test_dashboard_configmaps(helm, chart_copy):
    for old in (chart_copy / "dashboards").glob("*.json"):
        old.unlink()
    dash = {"title": "muxtune / test", "uid": "muxtune-test", "panels": [{"type": "timeseries", "targets": [{"expr": "up{job=\"x\"}"}]}]}
    (chart_copy / "dashboards" / "cluster_overview.json").write_text(json.dumps(dash, indent=2))
    (cm,) = by_kind(render(helm, "--set", "dashboards.annotations.grafana_folder=muxtune", chart=chart_copy))["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "muxtune"}
    assert cm["metadata"]["name"] == "mux-muxtune-dashboard-cluster-overview"
    assert json.loads(cm["data"]["cluster_overview.json"]) == dash
    assert "ConfigMap" not in by_kind(render(helm, "--set", "dashboards.enabled=false", chart=chart_copy))


def test_repository_dashboards_render(helm):
    names = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    cms = by_kind(render(helm)).get("ConfigMap", [])
    assert sorted(k for cm in cms for k in cm["data"]) == names
    for cm in cms:
        for text in cm["data"].values():
            json.loads(text)


# ------------------------------------------------------------------------------- real cluster


@pytest.mark.cluster
def test_install_into_cluster(helm, kube_cluster):
    """helm install into a restricted namespace of a real API server: the CRDs are accepted, the
    operator pod passes the restricted Pod Security admission, and its ServiceAccount can do what
    the operator needs and nothing more."""
    ns = f"muxtune-chart-{uuid.uuid4().hex[:6]}"
    k = kube_cluster.kubectl
    k("create", "namespace", ns)
    k("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/warn=restricted")
    env = kube_cluster.env()
    release = "mux"
    try:
        p = run_helm(helm, "install", release, str(CHART), "-n", ns, *OUTPUT, "--dry-run=server", env=env)
        assert "Warning" not in p.stderr, p.stderr
        p = run_helm(helm, "install", release, str(CHART), "-n", ns, *OUTPUT, "--wait", "--timeout", "120s", env=env)
        assert "Warning" not in p.stderr, p.stderr
        for crd in ("finetunetasks", "basemodels", "backbonegroups"):
            k("get", "crd", f"{crd}.muxtune.io")
        # the ReplicaSet's pod was admitted under the restricted profile
        pods = json.loads(k("get", "pods", "-n", ns, "-l", "app.kubernetes.io/instance=mux", "-o", "json").stdout)["items"]
        assert len(pods) == 1, pods
        sa = f"system:serviceaccount:{ns}:mux-muxtune"

        def can(verb: str, resource: str, *extra: str) -> bool:
            resource, _, sub = resource.partition("/")
            if sub:
                extra = (*extra, f"--subresource={sub}")
            r = k("auth", "can-i", verb, resource, "--as", sa, *extra, check=False)
            return r.stdout.strip() == "yes"

        for verb, res in [("patch", "finetunetasks.muxtune.io"), ("watch", "finetunetasks.muxtune.io"),
                          ("update", "finetunetasks.muxtune.io/status"), ("create", "backbonegroups.muxtune.io"),
                          ("delete", "pods"), ("create", "configmaps"), ("create", "services"), ("list", "nodes"),
                          ("create", "secrets"), ("create", "poddisruptionbudgets.policy"),
                          ("create", "events"), ("patch", "basemodels.muxtune.io/status")]:
            assert can(verb, res, "-A"), f"operator cannot {verb} {res}"
        for verb, res in [("delete", "finetunetasks.muxtune.io"), ("create", "finetunetasks.muxtune.io"),
                          ("get", "secrets"), ("list", "secrets"), ("delete", "basemodels.muxtune.io"),
                          ("create", "deployments.apps"), ("delete", "nodes"), ("create", "clusterroles.rbac.authorization.k8s.io"),
                          ("create", "pods/exec")]:
            assert not can(verb, res, "-A"), f"operator can {verb} {res}"
    finally:
        run_helm(helm, "uninstall", release, "-n", ns, "--wait", env=env, check=False)
        k("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.parametrize("values", [[], ["--set", "engine.output.pvc="], ["--set", "engine.output.ephemeral=false"]])
def test_an_install_without_persistent_output_is_refused(helm, values):
    """Adapters must outlive their group's pods: no output storage, no install (unless ephemeral on purpose)."""
    for cmd in (["template", "mux"], ["lint", "--strict"]):
        p = run_helm(helm, *cmd, str(CHART), *values, check=False)
        assert p.returncode != 0 and "output" in (p.stderr + p.stdout), p.stderr
    (dep,) = by_kind(render(helm, "--set", "engine.output.ephemeral=true"))["Deployment"]
    assert "--ephemeral-output" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_operator_knows_its_namespace_and_prometheus(helm):
    (dep,) = by_kind(render(helm, "--set", "monitoring.namespace=prom"))["Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--operator-namespace=muxtune-system" in args and "--monitoring-namespace=prom" in args
    assert "--ephemeral-output" not in args
