"""An engine Pod's manifest: a pure function of (group, rank, config, BaseModel).

Isolation: the pod mounts only its member namespaces' areas, never the data or output root:
``/data/<ns>`` (read-only) and ``/output/<ns>`` per member namespace, either subPath ``<ns>`` of
one shared volume or one claim per namespace (OperatorConfig's storage settings). A single
namespace's group mounts exactly its own namespace; a shared group the namespaces listed in its
``muxtune.io/namespaces`` annotation, fixed when it was created (the planner only adds a task to a
shared group that already mounts its namespace). The group's HMAC key (muxtune/facts/trust.py) comes
from a Secret; the pod has no API token (automountServiceAccountToken false, a ServiceAccount
with no bindings) and runs under the restricted Pod Security Standard.

Parallel layouts run from the pod spec alone. A group of dp pods x (tp x pp) GPUs is one
torch.distributed world of dp*tp*pp ranks: each pod runs ``muxtune run ... --dp --tp --pp`` with
torchrun's variables PET_NNODES (dp), PET_NPROC_PER_NODE (tp*pp), PET_NODE_RANK (the pod's rank),
PET_MASTER_ADDR (pod 0's DNS name through the group's headless Service: ``<group>-0.<group>.<ns>.svc``)
and PET_MASTER_PORT, and no RANK/WORLD_SIZE, so muxtune's launcher (engine/parallel/ranks.py, torch's
elastic agent configured by torchrun's own parser) starts the pod's share of the ranks as torchrun
would. One pod with one GPU runs a single process, as before. A multi-pod group's pods never restart
in place (restartPolicy Never): a rank that fails fails its pod, and the operator restarts the whole
group (operator/gang.py). Only pod 0 (global rank 0) serves /healthz, /metrics and /v1/status, so
only it has a readiness probe. A group with a Kueue queue gives every pod the queue label, the
pod-group name (the group's) and the total count, identical on all pods: one Workload, all or nothing.
"""
from __future__ import annotations

import hashlib
import json

from muxtune.facts.data_limits import DEFAULT_MAX_FILE_BYTES
from muxtune.operator.config import (
    ANN_ENGINE_BUDGET,
    ANN_GPU_MEMORY,
    ANN_NAMESPACES,
    ANN_POD_TEMPLATE,
    ANN_QUEUE,
    DATA_MOUNT,
    GPU_MEMORY_LABEL,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    GPU_SHARED_RESOURCE,
    KEY_FILE,
    KEY_MOUNT,
    KUEUE_POD_GROUP_LABEL,
    KUEUE_QUEUE_LABEL,
    KUEUE_TOTAL_COUNT_ANNOTATION,
    LABEL_GROUP,
    MODELS_MOUNT,
    OUTPUT_MOUNT,
    RENDEZVOUS_PORT,
    SERVING_PORT,
    SERVING_TOKENS_FILE,
    SERVING_TOKENS_MOUNT,
    TASKS_FILE,
    TASKS_MOUNT,
    OperatorConfig,
)
from muxtune.facts.quantization import NO_QUANTIZATION
from muxtune.operator.keys import status_token_sha256

RUN_AS = 65532


def configmap_name(group: str) -> str:
    return f"{group}-tasks"


def pod_name(group: str, rank: int) -> str:
    return f"{group}-{rank}"


def serving_endpoint(group: str, namespace: str) -> str:
    """Where a group's OpenAI API answers: pod 0, where global rank 0 fronts it, by its stable DNS
    name through the group's headless Service (every pod has hostname and subdomain set)."""
    return f"http://{pod_name(group, 0)}.{group}.{namespace}.svc:{SERVING_PORT}/v1"


def key_secret_name(group: dict) -> str:
    """Per group object (uid), so a re-created namesake never mounts its predecessor's key."""
    return f"{group['metadata']['name']}-key-{(group['metadata'].get('uid') or 'x')[:8]}"


def serving_tokens_secret_name(group: dict) -> str:
    """The digests of the member namespaces' serving tokens (operator/isolation.py)."""
    return f"{group['metadata']['name']}-serving-tokens"


def group_namespaces(group: dict) -> list[str]:
    """Namespaces whose areas the group's pods mount."""
    meta = group["metadata"]
    ann = (meta.get("annotations") or {}).get(ANN_NAMESPACES)
    if ann:
        return sorted({n for n in ann.split(",") if n})
    return [meta["namespace"]]


def engine_args(config: OperatorConfig, dp: int = 1, tp: int = 1, pp: int = 1, serving: dict | None = None,
                token_budget: int | None = None, recompute: bool = False,
                gpu_memory_fraction: float | None = None) -> list[str]:
    """The engine's command line; with the group's spec.serving it also serves the adapters of the
    members that enabled serving (and only those) on the serving port, within the group's SLOs.
    In a group laid out over several ranks, global rank 0 serves and the other ranks follow its
    decisions; every rank gets the same line (torchrun's env says which rank it is). The
    planner's token budget and recompute are what the group's memory was sized for; on a shared GPU
    the engine is told its share (--gpu-memory-fraction), which it enforces."""
    args = [
        "run", f"{TASKS_MOUNT}/{TASKS_FILE}", "--output", OUTPUT_MOUNT, "--data-root", DATA_MOUNT, "--watch",
        "--metrics-host", "0.0.0.0", "--metrics-port", str(config.engine_metrics_port), "--no-progress",
        "--no-remote",  # no credentials here: staging and export Jobs move remote data (operator/transfers.py)
    ]
    if config.status_token:  # the engine gets the digest only: a pod in a tenant's namespace never holds the token
        args += ["--status-token-sha256", status_token_sha256(config.status_token)]
    if config.max_dataset_bytes != DEFAULT_MAX_FILE_BYTES:  # read what the staging Jobs may copy
        args += ["--max-dataset-bytes", str(config.max_dataset_bytes)]
    if token_budget:
        args += ["--token-budget", str(int(token_budget))]
    if recompute:
        args.append("--recompute")
    if gpu_memory_fraction:
        args += ["--gpu-memory-fraction", f"{float(gpu_memory_fraction):g}"]
    if dp * tp * pp > 1:
        args += ["--dp", str(dp), "--tp", str(tp), "--pp", str(pp)]
    if serving:
        args += ["--serve-port", str(serving.get("port", SERVING_PORT)), "--serve-host", "0.0.0.0",
                 "--serve-tasks", "enabled", "--serve-tokens", f"{SERVING_TOKENS_MOUNT}/{SERVING_TOKENS_FILE}",
                 "--slo-ttft-ms", format(float(serving["sloTtftMs"]), "g"),
                 "--slo-tpot-ms", format(float(serving["sloTpotMs"]), "g")]  # 80 and 80.0 alike (JSON round trips)
    return args


def master_addr(group: str, namespace: str, dp: int) -> str:
    """Where the ranks meet: pod 0 through the headless Service, or this pod for a one-pod group."""
    return f"{pod_name(group, 0)}.{group}.{namespace}.svc" if dp > 1 else "127.0.0.1"


def torchrun_env(group: str, namespace: str, rank: int, dp: int, tp: int, pp: int) -> list[dict]:
    """torchrun's PET_* defaults for this pod (none for a one-process group)."""
    if dp * tp * pp == 1:
        return []
    return [{"name": k, "value": str(v)} for k, v in (
        ("PET_NNODES", dp), ("PET_NPROC_PER_NODE", tp * pp), ("PET_NODE_RANK", rank),
        ("PET_MASTER_ADDR", master_addr(group, namespace, dp)), ("PET_MASTER_PORT", RENDEZVOUS_PORT))]


def kueue_metadata(group: dict) -> tuple[dict, dict]:
    """(labels, annotations) that make the group's pods one Kueue pod group, or empty ones."""
    meta = group["metadata"]
    queue = (meta.get("annotations") or {}).get(ANN_QUEUE)
    if not queue:
        return {}, {}
    dp = int(((group.get("spec") or {}).get("parallelism") or {}).get("dp", 1))
    return ({KUEUE_QUEUE_LABEL: queue, KUEUE_POD_GROUP_LABEL: meta["name"]},
            {KUEUE_TOTAL_COUNT_ANNOTATION: str(dp)})


def _shared_volume(name: str, pvc: str | None, host_path: str | None, read_only: bool, config: OperatorConfig) -> dict:
    if pvc:
        return {"name": name, "persistentVolumeClaim": {"claimName": pvc, "readOnly": read_only}}
    if host_path:
        return {"name": name, "hostPath": {"path": host_path, "type": "Directory"}}
    if name == "output" and config.output_problem():  # the CLI refuses to start so; a library caller too
        raise ValueError(config.output_problem())
    return {"name": name, "emptyDir": {}}  # no data configured (an empty area), or --ephemeral-output


def area_volumes(kind: str, group: dict, config: OperatorConfig) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) of the data or output areas of the group's namespaces."""
    read_only = kind == "data"
    root = DATA_MOUNT if kind == "data" else OUTPUT_MOUNT
    per_ns = config.data_pvc_per_namespace if kind == "data" else config.output_pvc_per_namespace
    namespaces = group_namespaces(group)
    shared_group = bool((group["metadata"].get("annotations") or {}).get(ANN_NAMESPACES))
    vols, mounts = [], []
    if per_ns:
        for i, ns in enumerate(namespaces):
            claim = f"{per_ns}-{ns}" if shared_group else per_ns
            vols.append({"name": f"{kind}-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
            mounts.append({"name": f"{kind}-{i}", "mountPath": f"{root}/{ns}", "readOnly": read_only})
        return vols, mounts
    pvc = config.data_pvc if kind == "data" else config.output_pvc
    host = config.data_host_path if kind == "data" else config.output_host_path
    vols.append(_shared_volume(kind, pvc, host, read_only, config))
    for ns in namespaces:
        mounts.append({"name": kind, "mountPath": f"{root}/{ns}", "subPath": ns, "readOnly": read_only})
    return vols, mounts


def model_volume(base_model: str, basemodel: dict | None, config: OperatorConfig | None = None) -> tuple[dict, dict] | None:
    """(volume, mount) for the backbone's weights, or None (built-in models need none). An hf or s3
    source is the directory its Job staged into the model cache (status.cachePath), read-only."""
    if not base_model.startswith("model:"):
        return None
    name = base_model.split(":", 1)[1]
    src = ((basemodel or {}).get("spec") or {}).get("source") or {}
    mount = {"name": "model", "mountPath": f"{MODELS_MOUNT}/{name}", "readOnly": True}
    if src.get("pvc"):
        if src["pvc"].get("path"):
            mount["subPath"] = src["pvc"]["path"].strip("/")
        return {"name": "model", "persistentVolumeClaim": {"claimName": src["pvc"]["claimName"], "readOnly": True}}, mount
    if src.get("hostPath"):
        return {"name": "model", "hostPath": {"path": src["hostPath"]["path"], "type": "Directory"}}, mount
    cached = ((basemodel or {}).get("status") or {}).get("cachePath")
    if (src.get("hf") or src.get("s3")) and cached and config is not None and config.model_cache_pvc:
        mount["subPath"] = cached
        return {"name": "model", "persistentVolumeClaim": {"claimName": config.model_cache_pvc, "readOnly": True}}, mount
    return None


def priority_class(config: OperatorConfig, priority: int | None) -> str | None:
    """The class of the highest band ``priority`` reaches (bands: minPriority -> className)."""
    if priority is None:
        return None
    best = None
    for band in config.engine_priority_classes:
        lo = int(band.get("minPriority", -1000))
        if priority >= lo and (best is None or lo > best[0]):
            best = (lo, band.get("className"))
    return best[1] if best else None


def _affinity(config: OperatorConfig, node_terms: list[dict], group: str, dp: int) -> dict | None:
    """The configured affinity with the plan's GPU requirements ANDed into every node selector term."""
    aff = json.loads(json.dumps(config.engine_affinity or {}))
    if node_terms:
        req = aff.setdefault("nodeAffinity", {}).setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
        terms = req.get("nodeSelectorTerms") or [{}]
        for t in terms:
            t["matchExpressions"] = list(t.get("matchExpressions") or []) + node_terms
        req["nodeSelectorTerms"] = terms
    if dp > 1:  # spread replicas over nodes
        aff.setdefault("podAntiAffinity", {}).setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append({
            "weight": 100,
            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {LABEL_GROUP: group}}}})
    return aff or None


def _trust_flag(base_model: str, basemodel: dict | None) -> list[str]:
    """--trust-remote-code only for a `model:` BaseModel whose (admin-written) spec allows it."""
    allowed = base_model.startswith("model:") and bool(((basemodel or {}).get("spec") or {}).get("trustRemoteCode"))
    return ["--trust-remote-code"] if allowed else []


def _quantize_flag(base_model: str, basemodel: dict | None) -> list[str]:
    """--quantize for a `model:` BaseModel stored quantized (spec.quantization): what the planner sized."""
    quantization = ((basemodel or {}).get("spec") or {}).get("quantization") or NO_QUANTIZATION
    return ["--quantize", quantization] if base_model.startswith("model:") and quantization != NO_QUANTIZATION else []


def pod_manifest(group: dict, rank: int, config: OperatorConfig, basemodel: dict | None = None,
                 labels: dict | None = None, owner: dict | None = None, priority: int | None = None) -> dict:
    """Rank ``rank``'s pod; its template hash annotation tells a changed spec from a current one."""
    meta = group["metadata"]
    name, ns = meta["name"], meta["namespace"]
    pod_spec = _pod_spec(group, rank, config, basemodel, priority)
    kueue_labels, kueue_annotations = kueue_metadata(group)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, rank),
            "namespace": ns,
            "labels": {**(labels or {}), **kueue_labels, "muxtune.io/rank": str(rank)},
            "annotations": dict(kueue_annotations),
            "ownerReferences": [owner] if owner else [],
        },
        "spec": pod_spec,
    }
    pod["metadata"]["annotations"][ANN_POD_TEMPLATE] = template_hash(pod_spec)
    pod["metadata"]["annotations"][ANN_ENGINE_BUDGET] = engine_budget(group["spec"])
    return pod


def engine_budget(spec: dict) -> str:
    """The --token-budget (and --recompute) a group's spec gives its engine, as its pods record it."""
    return f"{spec.get('tokenBudget') or ''}{'+recompute' if spec.get('recompute') else ''}"


def runs_other_budget(pod: dict, spec: dict) -> bool:
    """A (compact) pod started with another budget than the group's spec now gives; pods written
    before pods recorded it count as current."""
    have = (pod.get("annotations") or {}).get(ANN_ENGINE_BUDGET)
    return have is not None and have != engine_budget(spec)


def _layout(group: dict) -> tuple[int, int, int]:
    par = group["spec"].get("parallelism") or {}
    return int(par.get("dp", 1)), int(par.get("tp", 1)), int(par.get("pp", 1))


def _pod_spec(group: dict, rank: int, config: OperatorConfig, basemodel: dict | None, priority: int | None) -> dict:
    """One engine container under the restricted Pod Security Standard, with no API token."""
    name = group["metadata"]["name"]
    dp = _layout(group)[0]
    volumes, mounts = _volumes(group, config, basemodel)
    tolerations = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    tolerations += [t for t in config.engine_tolerations if t not in tolerations]
    pod_spec: dict = {
        # one pod: a crashed engine restarts in place and resumes from its checkpoints; several: a
        # failed rank fails its pod and the operator restarts the whole world (operator/gang.py)
        "restartPolicy": "OnFailure" if dp == 1 else "Never",
        "hostname": pod_name(name, rank),
        "subdomain": name,
        "enableServiceLinks": False,
        "serviceAccountName": config.engine_service_account,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(group, rank, config, mounts, basemodel)],
        "volumes": volumes,
        "tolerations": tolerations,
    }
    _add_scheduling(pod_spec, group, config, priority)
    return pod_spec


def _add_scheduling(pod_spec: dict, group: dict, config: OperatorConfig, priority: int | None) -> None:
    """The optional fields: configured node selector, affinity (with the plan's GPU class), pull
    secrets and the priority class of the group's highest task priority."""
    if config.engine_node_selector:
        pod_spec["nodeSelector"] = dict(config.engine_node_selector)
    affinity = _affinity(config, _node_terms(group), group["metadata"]["name"], _layout(group)[0])
    if affinity:
        pod_spec["affinity"] = affinity
    if config.engine_image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in config.engine_image_pull_secrets]
    pc = priority_class(config, priority)
    if pc:
        pod_spec["priorityClassName"] = pc


def _volumes(group: dict, config: OperatorConfig, basemodel: dict | None) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts): the member tasks, the group's key, scratch space, the member namespaces'
    areas and the backbone's weights; nothing else of the node or the cluster."""
    volumes = [
        {"name": "tasks", "configMap": {"name": configmap_name(group["metadata"]["name"])}},
        {"name": "group-key", "secret": {"secretName": key_secret_name(group), "defaultMode": 0o440}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        {"name": "output-root", "emptyDir": {"sizeLimit": "1Gi"}},  # /output itself; areas mount below it
    ]
    mounts = [
        {"name": "tasks", "mountPath": TASKS_MOUNT, "readOnly": True},
        {"name": "group-key", "mountPath": KEY_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "output-root", "mountPath": OUTPUT_MOUNT},
    ]
    for kind in ("data", "output"):
        v, m = area_volumes(kind, group, config)
        volumes += v
        mounts += m
    if group["spec"].get("serving"):  # only digests of the member namespaces' tokens (operator/isolation.py)
        volumes.append({"name": "serving-tokens", "secret": {"secretName": serving_tokens_secret_name(group),
                                                            "defaultMode": 0o440}})
        mounts.append({"name": "serving-tokens", "mountPath": SERVING_TOKENS_MOUNT, "readOnly": True})
    mv = model_volume(group["spec"]["baseModel"], basemodel, config)
    if mv:
        volumes.append(mv[0])
        mounts.append(mv[1])
    return volumes, mounts


def _container(group: dict, rank: int, config: OperatorConfig, mounts: list[dict], basemodel: dict | None = None) -> dict:
    """The engine: its command line, environment, ports and GPUs follow the group's layout."""
    meta, spec = group["metadata"], group["spec"]
    dp, tp, pp = _layout(group)
    serving = spec.get("serving")  # fixed when the pod is created (pods are not restarted for it)
    container = {
        "name": "engine",
        "image": config.engine_image,
        "imagePullPolicy": config.engine_image_pull_policy,
        "command": ["muxtune"],
        "args": (engine_args(config, dp, tp, pp, serving, spec.get("tokenBudget"), bool(spec.get("recompute")),
                             spec.get("gpuMemoryFraction"))
                 + _trust_flag(spec["baseModel"], basemodel) + _quantize_flag(spec["baseModel"], basemodel)),
        "env": _env(meta["name"], meta["namespace"], rank, dp, tp, pp, config.mlflow_tracking_uri),
        "ports": _ports(config, dp, serving if rank == 0 else None),
        "resources": _resources(config, int(spec.get("gpusPerPod", 1)), bool(spec.get("gpuMemoryFraction"))),
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if rank == 0:  # global rank 0 serves the group's endpoints
        container["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10,
                                       "failureThreshold": 3}
    return container


def _env(name: str, ns: str, rank: int, dp: int, tp: int, pp: int, mlflow_uri: str | None = None) -> list[dict]:
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "MUXTUNE_HOME", "value": "/tmp/muxtune"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "MUXTUNE_GROUP", "value": name},
        {"name": "MUXTUNE_GROUP_KEY_FILE", "value": f"{KEY_MOUNT}/{KEY_FILE}"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        *torchrun_env(name, ns, rank, dp, tp, pp),
        *([{"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri}] if mlflow_uri else []),
    ]


def _ports(config: OperatorConfig, dp: int, serving: dict | None) -> list[dict]:
    """Metrics always; the rendezvous port across pods; the serving port where the group serves
    (pod 0's: global rank 0 fronts the API)."""
    ports = [{"name": "metrics", "containerPort": config.engine_metrics_port, "protocol": "TCP"}]
    if dp > 1:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    if serving:
        ports.append({"name": "serving", "containerPort": serving.get("port", SERVING_PORT), "protocol": "TCP"})
    return ports


def _resources(config: OperatorConfig, gpus: int, shared: bool = False) -> dict:
    """CPU and memory requests; the GPUs, or on a shared GPU one time-sliced replica of it."""
    resources: dict = {"requests": {"cpu": config.engine_cpu_request, "memory": config.engine_memory_request}}
    if config.engine_limits:
        resources["limits"] = dict(config.engine_limits)
    if gpus > 0:
        name, count = (GPU_SHARED_RESOURCE, "1") if shared else (GPU_RESOURCE, str(gpus))
        resources["requests"][name] = count
        resources.setdefault("limits", {})[name] = count
    return resources


def _node_terms(group: dict) -> list[dict]:
    """The GPU class the plan was sized for: its product, and at least its GPU memory."""
    spec = group["spec"]
    gpus = int(spec.get("gpusPerPod", 1))
    gpu_mem = (group["metadata"].get("annotations") or {}).get(ANN_GPU_MEMORY)
    product = spec.get("gpuProduct")
    node_terms = []
    if product:
        node_terms.append({"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [product]})
    if gpu_mem and gpus > 0:
        node_terms.append({"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(int(gpu_mem) - 1)]})
    return node_terms


def template_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
