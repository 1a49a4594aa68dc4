"""Kueue next to the dev cluster: the real ``sigs.k8s.io/kueue`` controller manager as a process on 127.0.0.1.

:func:`ensure` (``muxtune dev-cluster up --kueue``, the ``kueue_cluster`` fixture) does, idempotently:

1. builds ``kueue`` if missing (an optional group in :mod:`build`: only who needs it pays the build);
2. signs, with the cluster CA, a serving certificate for 127.0.0.1 (webhooks and metrics) and a
   cluster-admin client certificate for Kueue's kubeconfig;
3. applies Kueue's CRDs as the module ships them (``config/components/crd``, copied at build time
   to the cache), with the conversion webhooks its kustomization enables pointed at
   ``https://127.0.0.1:<port>/convert`` (v1beta1 is stored, v1beta2 served: both need it);
4. writes a Kueue Configuration (pod integration on, namespaces selected by a label, internal cert
   management and leader election off, VisibilityOnDemand off: it would bind the fixed port 8082)
   and starts the process;
5. once its /readyz answers, registers the Mutating/ValidatingWebhookConfigurations rendered from
   the module's ``config/components/webhook`` (kustomize's namespaceSelector patches applied; URL
   clientConfig and the CA bundle instead of a Service), keeping only Kueue's own API and the
   enabled integrations: a webhook whose handler is not served (a disabled integration) answers
   404 and, being ``failurePolicy: Fail``, would block that kind cluster-wide;
6. proves the API server reaches the webhooks: a server-side dry run of a queue-labelled pod in a
   managed namespace comes back with Kueue's scheduling gate.

Pods are managed only in namespaces labelled ``kueue-managed=true`` (:data:`MANAGED_NAMESPACE_LABEL`,
the label of Kueue's own docs), so Kueue on a shared test cluster touches nothing else.  A default
upstream install manages every namespace but kube-system and kueue-system instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterable

import yaml

from muxtune.devcluster import build as _build
from muxtune.devcluster import cluster as _cluster
from muxtune.devcluster.cluster import ClusterInfo
from muxtune.devcluster.kueue_objects import ADMISSION_GATE, MANAGED_NAMESPACE_LABEL, QUEUE_NAME_LABEL, managed_namespace

NAMESPACE = "kueue-system"
WEBHOOK_CONFIGS = {  # kind -> name (upstream's names: config/default adds the "kueue-" prefix)
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}
# integration -> (apiGroup, resource) of the objects its webhooks admit
FRAMEWORK_RESOURCES = {
    "pod": ("", "pods"),
    "batch/job": ("batch", "jobs"),
    "statefulset": ("apps", "statefulsets"),
    "deployment": ("apps", "deployments"),
}
DEFAULT_FRAMEWORKS = ("pod",)
PROBE_NAMESPACE = "kueue-probe"


def _log(msg: str) -> None:
    _cluster._log(f"kueue: {msg}")


def _components_dir() -> Path:
    return _build.share_dir("kueue") / "config" / "components"


def _load_yaml(path: Path) -> list[dict]:
    with open(path) as fh:
        return [d for d in yaml.load_all(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


def managed_selector() -> dict:
    key, value = MANAGED_NAMESPACE_LABEL
    return {"matchLabels": {key: value}}


# --------------------------------------------------------------------------- rendering


def render_crds(webhook_url: str, ca_pem: bytes) -> list[dict]:
    """Kueue's CRDs, with the conversion webhooks of its kustomization (``patches/webhook_in_*``)
    calling ``webhook_url`` + their path, trusted through ``ca_pem``."""
    crd_dir = _components_dir() / "crd"
    kust = _load_yaml(crd_dir / "kustomization.yaml")[0]
    crds = {}
    for rel in kust["resources"]:
        for doc in _load_yaml(crd_dir / rel):
            crds[doc["metadata"]["name"]] = doc
    for patch in kust.get("patches") or []:
        for doc in _load_yaml(crd_dir / patch["path"]):
            conv = doc.get("spec", {}).get("conversion")
            if not conv or doc["metadata"]["name"] not in crds:
                continue
            conv = json.loads(json.dumps(conv))
            svc = conv["webhook"]["clientConfig"].pop("service")
            conv["webhook"]["clientConfig"] = {"url": webhook_url + svc.get("path", "/convert"), "caBundle": _cluster._b64(ca_pem)}
            crds[doc["metadata"]["name"]]["spec"]["conversion"] = conv
    return list(crds.values())


def _merge_webhook_patches(configs: dict[str, dict], patches: Iterable[dict]) -> set[str]:
    """Apply kustomize's strategic-merge patches on webhooks (merged by webhook name); returns the
    names of the webhooks they touched."""
    touched = set()
    for patch in patches:
        for doc in yaml.safe_load_all(patch.get("patch", "")):
            if not doc or doc.get("kind") not in configs:
                continue
            by_name = {w["name"]: w for w in configs[doc["kind"]]["webhooks"]}
            for w in doc.get("webhooks") or []:
                if w["name"] in by_name:
                    by_name[w["name"]].update({k: v for k, v in w.items() if k != "name"})
                    touched.add(w["name"])
    return touched


def _webhook_wanted(webhook: dict, frameworks: Iterable[str]) -> bool:
    wanted = {FRAMEWORK_RESOURCES[f] for f in frameworks}
    for rule in webhook.get("rules") or []:
        for group in rule.get("apiGroups") or []:
            for res in rule.get("resources") or []:
                if group == "kueue.x-k8s.io" or (group, res) in wanted:
                    return True
    return False


def render_webhooks(webhook_url: str, ca_pem: bytes, frameworks: Iterable[str] = DEFAULT_FRAMEWORKS,
                    namespace_selector: dict | None = None) -> list[dict]:
    """Kueue's Mutating and ValidatingWebhookConfiguration from the module's ``config/components/webhook``,
    for Kueue's API and ``frameworks`` only, calling ``webhook_url`` + each webhook's path.

    ``namespace_selector`` (default :func:`managed_selector`) replaces the selector kustomize's
    patches give the pod-based webhooks, as Kueue's Helm chart makes it match
    ``managedJobsNamespaceSelector``."""
    frameworks = list(frameworks)
    unknown = set(frameworks) - set(FRAMEWORK_RESOURCES)
    if unknown:
        raise ValueError(f"unsupported Kueue integrations {sorted(unknown)}; known: {sorted(FRAMEWORK_RESOURCES)}")
    wh_dir = _components_dir() / "webhook"
    configs = {d["kind"]: d for d in _load_yaml(wh_dir / "manifests.yaml") if d.get("kind") in WEBHOOK_CONFIGS}
    touched = _merge_webhook_patches(configs, _load_yaml(wh_dir / "kustomization.yaml")[0].get("patches") or [])
    selector = namespace_selector if namespace_selector is not None else managed_selector()
    out = []
    for kind, cfg in configs.items():
        hooks = []
        for w in cfg["webhooks"]:
            if not _webhook_wanted(w, frameworks):
                continue
            path = w["clientConfig"]["service"]["path"]
            w["clientConfig"] = {"url": webhook_url + path, "caBundle": _cluster._b64(ca_pem)}
            if w["name"] in touched:
                w["namespaceSelector"] = selector
            hooks.append(w)
        out.append({"apiVersion": cfg["apiVersion"], "kind": kind, "metadata": {"name": WEBHOOK_CONFIGS[kind]}, "webhooks": hooks})
    return out


def render_config(*, webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path,
                  frameworks: Iterable[str] = DEFAULT_FRAMEWORKS, namespace_selector: dict | None = None) -> dict:
    """The Kueue ``Configuration`` (config.kueue.x-k8s.io/v1beta2) the process starts with."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "managedJobsNamespaceSelector": namespace_selector if namespace_selector is not None else managed_selector(),
        "integrations": {"frameworks": list(frameworks)},
        # VisibilityOnDemand serves an aggregated API on the fixed port 8082 (two clusters would clash)
        "featureGates": {"VisibilityOnDemand": False},
    }


# --------------------------------------------------------------------------- process


def _kueue_dir(info: ClusterInfo) -> Path:
    return info.state_dir / "kueue"


def _certs(info: ClusterInfo) -> tuple[Path, Path]:
    """``(serving cert dir holding tls.crt/tls.key, kubeconfig)``, made once per cluster."""
    pki = info.state_dir / "pki"
    serving = _kueue_dir(info) / "serving-certs"
    kubeconfig = info.state_dir / "kubeconfigs" / "kueue.kubeconfig"
    if not (serving / "tls.crt").is_file():
        serving.mkdir(parents=True, exist_ok=True)
        crt, key = _cluster.issue_cert(pki, "kueue-serving", "/CN=kueue-webhook", "serverAuth", "IP:127.0.0.1,DNS:localhost")
        key.replace(serving / "tls.key")
        crt.replace(serving / "tls.crt")
    if not kubeconfig.is_file():
        crt, key = _cluster.issue_cert(pki, "kueue", "/O=system:masters/CN=kueue-controller-manager", "clientAuth")
        _cluster._write_kubeconfig(kubeconfig, info.server, info.ca_cert.read_bytes(), "kueue",
                                   {"client-certificate-data": _cluster._b64(crt.read_bytes()),
                                    "client-key-data": _cluster._b64(key.read_bytes())})
    return serving, kubeconfig


def _ready(info: ClusterInfo) -> bool:
    port = info.ports.get("kueue-health")
    return bool(port) and _cluster._get(f"http://127.0.0.1:{port}/readyz")[0] == 200


def running(info: ClusterInfo) -> bool:
    """Kueue's process is ours, alive and ready, and its webhooks are registered."""
    pid = info.pids.get("kueue")
    if not pid or not _cluster._pid_alive(pid, info.state_dir) or not _ready(info):
        return False
    p = info.kubectl("get", "mutatingwebhookconfiguration", WEBHOOK_CONFIGS["MutatingWebhookConfiguration"], "-o", "name", check=False)
    return p.returncode == 0


def _ensure_namespace(info: ClusterInfo, name: str) -> None:
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    _cluster.apply_manifests(json.dumps(doc), kubeconfig=info.kubeconfig)


def _probe_webhook(info: ClusterInfo, timeout: float) -> None:
    """Wait until a server-side dry run of a queue-labelled pod comes back gated by Kueue."""
    _cluster.apply_manifests(json.dumps(managed_namespace(PROBE_NAMESPACE)), kubeconfig=info.kubeconfig)
    _cluster.wait_for_default_service_account(info, PROBE_NAMESPACE, timeout=timeout)
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "probe", "namespace": PROBE_NAMESPACE, "labels": {QUEUE_NAME_LABEL: "probe"}},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/probe", "resources": {"requests": {"cpu": "1m"}}}]},
    }
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        p = info.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod), check=False)
        if p.returncode == 0:
            gates = [g["name"] for g in json.loads(p.stdout)["spec"].get("schedulingGates") or []]
            if ADMISSION_GATE in gates:
                return
            last = f"no {ADMISSION_GATE} gate: {gates}"
        else:
            last = p.stderr.strip()
        time.sleep(0.3)
    raise TimeoutError(f"the API server did not call Kueue's pod webhook within {timeout:.0f}s: {last}\n"
                       f"{_cluster._log_tail(info.state_dir, 'kueue')}")


def ensure(info: ClusterInfo, *, frameworks: Iterable[str] = DEFAULT_FRAMEWORKS, build: bool = True,
           timeout: float = 180) -> ClusterInfo:
    """Start Kueue on the running dev cluster ``info`` unless it already runs there; returns ``info``
    with ``pids["kueue"]`` and the ``kueue-*`` ports recorded (also in ``cluster.json``)."""
    if running(info):
        return info
    t0 = time.monotonic()
    frameworks = list(frameworks)
    if build:
        _build.ensure_binaries(["kueue"])
    elif _build.missing_binaries(["kueue"]):
        raise RuntimeError("kueue is not built; run `muxtune dev-cluster build --kueue`")
    stop(info, quiet=True)  # a stale process or half-made registration from an earlier try
    serving, kubeconfig = _certs(info)
    ca = info.ca_cert.read_bytes()
    webhook_port, health_port, metrics_port = _cluster._free_ports(3)
    url = f"https://127.0.0.1:{webhook_port}"
    _cluster.apply_crds(json.dumps({"apiVersion": "v1", "kind": "List", "items": render_crds(url, ca)}),
                        kubeconfig=info.kubeconfig, timeout=timeout)
    _ensure_namespace(info, NAMESPACE)
    config = render_config(webhook_port=webhook_port, health_port=health_port, metrics_port=metrics_port,
                           cert_dir=serving, frameworks=frameworks)
    cfg_path = _kueue_dir(info) / "config.yaml"
    cfg_path.write_text(json.dumps(config, indent=2))
    env = dict(os.environ, KUEUE_METRICS_CERT_DIR=str(serving))  # see the SourcePatch in build.py
    pid = _cluster._spawn("kueue", [f"--config={cfg_path}", f"--kubeconfig={kubeconfig}"], info.state_dir, env=env)
    info.pids["kueue"] = pid
    info.ports.update({"kueue-webhook": webhook_port, "kueue-health": health_port, "kueue-metrics": metrics_port})
    (info.state_dir / "cluster.json").write_text(info.to_json())
    try:
        _cluster._wait("kueue /readyz", lambda: (_ready(info), None), timeout, info.state_dir, "kueue", pid)
        _cluster.apply_manifests(json.dumps({"apiVersion": "v1", "kind": "List",
                                             "items": render_webhooks(url, ca, frameworks)}), kubeconfig=info.kubeconfig)
        _probe_webhook(info, timeout)
    except BaseException:
        _log(f"start failed; stopping it (log: {info.state_dir / 'logs' / 'kueue.log'})")
        stop(info, quiet=True)
        raise
    _log(f"{_build.KUEUE_VERSION} ready in {time.monotonic() - t0:.1f}s (webhooks at {url}, integrations {frameworks})")
    return info


def stop(info: ClusterInfo, *, quiet: bool = False) -> None:
    """Unregister Kueue's webhooks (so pods are admitted without it) and stop its process."""
    for kind, name in WEBHOOK_CONFIGS.items():
        info.kubectl("delete", kind.lower(), name, "--ignore-not-found", check=False)
    pid = info.pids.pop("kueue", None) or _cluster._read_pids(info.state_dir).get("kueue")
    if pid and _cluster._pid_alive(pid, info.state_dir):
        _cluster._stop_pids(info.state_dir, {"kueue": pid})
        if not quiet:
            _log(f"stopped (pid {pid})")
    with contextlib.suppress(OSError):
        (info.state_dir / "pids" / "kueue.pid").unlink()
    for k in ("kueue-webhook", "kueue-health", "kueue-metrics"):
        info.ports.pop(k, None)
    if (info.state_dir / "cluster.json").exists():
        (info.state_dir / "cluster.json").write_text(info.to_json())
