"""kopf wiring: indices (in-memory caches fed by watches), event handlers that wake the reconciler,
login with the operator's credentials, and the startup/cleanup of the Controller.

Run with `muxtune operator` (muxtune.operator.cli.OperatorCommand), or plainly
``kopf run --standalone -m muxtune.operator.handlers --all-namespaces`` (settings then come from
MUXTUNE_OPERATOR_* environment variables, see OperatorConfig.from_env).

No handler here persists anything on the watched objects: no finalizers, no kopf annotations,
no status.kopf. Everything the operator needs is derived from the current objects.
"""
from __future__ import annotations

import copy
import logging
import os
import socket
import uuid

import kopf

from muxtune.api.meta import GROUP, VERSION
from muxtune.operator import metrics
from muxtune.operator.config import GPU_RESOURCE, LABEL_MANAGED_BY, MANAGED_BY, OperatorConfig
from muxtune.operator.controller import Controller
from muxtune.operator.credentials import KubeCredentials
from muxtune.operator.kube import KubeClient
from muxtune.operator.leader import LeaderElector
from muxtune.operator.world import compact_node, compact_pod, pod_gpus

log = logging.getLogger("muxtune.operator")

CONFIG: OperatorConfig | None = None  # set by OperatorCommand before kopf starts; else from env
CONTROLLER: Controller | None = None
_METRICS_SERVED: set[int] = set()
_CREDS: list[KubeCredentials] = []


def config() -> OperatorConfig:
    global CONFIG
    if CONFIG is None:
        CONFIG = OperatorConfig.from_env()
    return CONFIG


def _plain(body) -> dict:
    return copy.deepcopy(dict(body))


# ---------------------------------------------------------------------- login & lifecycle

def credentials() -> KubeCredentials:
    """One identity for kopf and the operator's client (loaded once; tokens refresh themselves)."""
    if not _CREDS:
        _CREDS.append(KubeCredentials(config().kubeconfig))
    return _CREDS[0]


@kopf.on.login()
def login(**_) -> kopf.ConnectionInfo:
    """kopf calls this at start and again after a 401: the token is refreshed each time."""
    c = credentials()
    token = c.token()
    return kopf.ConnectionInfo(
        server=c.server,
        ca_data=c.ca_data,
        insecure=c.insecure or None,
        scheme="Bearer" if token else None,
        token=token,
        certificate_data=c.cert_data,
        private_key_data=c.key_data,
        default_namespace=c.namespace,
    )


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **kwargs) -> None:
    global CONTROLLER
    cfg = config()
    settings.peering.standalone = True  # one replica; no peering CRD needed in RBAC
    settings.posting.level = logging.WARNING  # kopf's own k8s Events: only problems
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    if cfg.metrics_port and cfg.metrics_port not in _METRICS_SERVED:
        metrics.serve(cfg.metrics_port)
        _METRICS_SERVED.add(cfg.metrics_port)
    client = KubeClient(credentials())
    client.on_request = lambda verb, res: metrics.API_REQUESTS.labels(verb, res).inc()
    elector = None
    if cfg.leader_elect:
        identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        elector = LeaderElector(client, cfg.shared_namespace, cfg.lease_name, identity, cfg.lease_duration,
                                cfg.lease_renew_interval, on_change=_leadership_changed)
    CONTROLLER = Controller(cfg, client, elector=elector)
    metrics.LEADER.set(0 if elector else 1)
    CONTROLLER.attach({k: v for k, v in kwargs.items() if k.startswith("muxtune_")})
    CONTROLLER.start()
    log.info("muxtune operator started (sharing=%s, shared namespace=%s, engine image=%s)",
             cfg.sharing_policy, cfg.shared_namespace, cfg.engine_image)


def _leadership_changed(leading: bool) -> None:
    metrics.LEADER.set(1 if leading else 0)
    if leading and CONTROLLER is not None:
        CONTROLLER.kick()


@kopf.on.cleanup()
async def cleanup(**_) -> None:
    if CONTROLLER is not None:
        await CONTROLLER.stop()
    for c in _CREDS:
        c.close()


def _wake(**kwargs) -> None:
    if CONTROLLER is not None:
        ev = kwargs.get("event") or {}
        if ev.get("type") == "DELETED" and kwargs.get("resource") is not None:
            CONTROLLER.forget(kwargs["resource"].plural, kwargs.get("namespace"), kwargs.get("name") or "")
        CONTROLLER.attach({k: v for k, v in kwargs.items() if k.startswith("muxtune_")})
        CONTROLLER.mark_ready()


# ---------------------------------------------------------------------- indices

@kopf.index(GROUP, VERSION, "finetunetasks")
def muxtune_tasks(body, namespace, name, **_):
    return {(namespace, name): _plain(body)}


@kopf.index(GROUP, VERSION, "backbonegroups")
def muxtune_groups(body, namespace, name, **_):
    return {(namespace, name): _plain(body)}


@kopf.index(GROUP, VERSION, "basemodels")
def muxtune_basemodels(body, name, **_):
    return {name: _plain(body)}


@kopf.index("v1", "nodes")
def muxtune_nodes(body, name, **_):
    return {name: compact_node(body)}


@kopf.index("v1", "namespaces")
def muxtune_namespaces(body, name, **_):
    """Namespace labels, for BaseModel spec.namespaceSelector."""
    return {name: dict((body.get("metadata") or {}).get("labels") or {})}


def _relevant_pod(body, **_) -> bool:
    labels = body.get("metadata", {}).get("labels") or {}
    return labels.get(LABEL_MANAGED_BY) == MANAGED_BY or pod_gpus(body) > 0


@kopf.index("v1", "pods", when=_relevant_pod)
def muxtune_pods(body, namespace, name, **_):
    """Our engine pods and any other pod that holds GPUs (for free-GPU accounting)."""
    return {(namespace, name): compact_pod(body)}


@kopf.index("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
def muxtune_jobs(body, namespace, name, **_):
    """Our staging, export and model-cache Jobs: whether each finished (operator/transfers.py)."""
    b = _plain(body)
    return {(namespace, name): {"metadata": b.get("metadata", {}), "status": b.get("status") or {}}}


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
def on_job_event(**kwargs):
    _wake(**kwargs)


@kopf.index("v1", "configmaps", labels={LABEL_MANAGED_BY: MANAGED_BY})
def muxtune_configmaps(body, namespace, name, **_):
    b = _plain(body)
    return {(namespace, name): {"metadata": b.get("metadata", {}), "data": b.get("data") or {}}}


@kopf.index("v1", "services", labels={LABEL_MANAGED_BY: MANAGED_BY})
def muxtune_services(body, namespace, name, **_):
    b = _plain(body)
    return {(namespace, name): {"metadata": b.get("metadata", {}), "spec": b.get("spec") or {}}}


# ---------------------------------------------------------------------- wake-ups

@kopf.on.event(GROUP, VERSION, "finetunetasks")
def on_task_event(**kwargs):
    _wake(**kwargs)


@kopf.on.event(GROUP, VERSION, "backbonegroups")
def on_group_event(**kwargs):
    _wake(**kwargs)


@kopf.on.event(GROUP, VERSION, "basemodels")
def on_basemodel_event(**kwargs):
    _wake(**kwargs)


@kopf.on.event("v1", "namespaces")
def on_namespace_event(body, name, type, **kwargs):
    labels = None if type == "DELETED" else dict((body.get("metadata") or {}).get("labels") or {})
    if _changed("namespace", None, name, labels) or (CONTROLLER is not None and not CONTROLLER.ready):
        _wake(name=name, **kwargs)


@kopf.on.event("v1", "configmaps", labels={LABEL_MANAGED_BY: MANAGED_BY})
def on_configmap_event(**kwargs):
    _wake(**kwargs)  # someone edited or deleted a group's ConfigMap: put it back


@kopf.on.event("v1", "services", labels={LABEL_MANAGED_BY: MANAGED_BY})
def on_service_event(**kwargs):
    _wake(**kwargs)


def _gpu_node(body, **_) -> bool:
    alloc = (body.get("status") or {}).get("allocatable") or {}
    return GPU_RESOURCE in alloc


_SEEN: dict[tuple[str, str, str], dict] = {}


def _changed(kind: str, namespace, name, compact: dict | None) -> bool:
    """Node heartbeats and similar no-op updates must not wake the reconciler."""
    key = (kind, namespace or "", name)
    if compact is None:
        return _SEEN.pop(key, None) is not None
    if _SEEN.get(key) == compact:
        return False
    _SEEN[key] = compact
    return True


@kopf.on.event("v1", "nodes", when=_gpu_node)
def on_node_event(body, name, type, **kwargs):
    c = None if type == "DELETED" else compact_node(body)
    if _changed("node", None, name, c) or (CONTROLLER is not None and not CONTROLLER.ready):
        _wake(name=name, **kwargs)


@kopf.on.event("v1", "pods", when=_relevant_pod)
def on_pod_event(body, namespace, name, type, **kwargs):
    c = None if type == "DELETED" else {k: v for k, v in compact_pod(body).items() if k != "metadata"}
    if _changed("pod", namespace, name, c) or (CONTROLLER is not None and not CONTROLLER.ready):
        _wake(namespace=namespace, name=name, **kwargs)
