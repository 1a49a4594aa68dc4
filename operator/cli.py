"""`muxtune plan` (dry-run placement) and `muxtune operator` (the kopf operator).

Top-level imports stay light (pydantic, pathlib): kopf and the planner load inside cli_cmd.
Also runnable on its own: ``python -m muxtune.operator.cli {plan,operator} ...``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import CliPositionalArg

from muxtune.facts.data_limits import DEFAULT_MAX_FILE_BYTES

INVENTORY_HELP = """Node inventory YAML: either Kubernetes Node objects (`kubectl get nodes -o yaml`; GPUs from
allocatable nvidia.com/gpu, memory from the nvidia.com/gpu.memory label, in MiB), or
`nodes: [{name, gpus, gpusFree, gpuMemoryMiB, gpuProduct, count}]`."""


def load_inventory(path: Path):
    import yaml

    from muxtune.operator.planner import NodeInfo
    from muxtune.operator.world import compact_node, node_inventory

    nodes: list[NodeInfo] = []
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if not doc:
            continue
        items = doc.get("items") if doc.get("kind") in ("List", "NodeList") else [doc] if doc.get("kind") == "Node" else None
        if items is not None:
            for n in items:
                nodes += node_inventory([compact_node(n)], [])  # whole GPUs, or time-sliced replicas
            continue
        for n in doc.get("nodes") or []:
            count = int(n.get("count", 1))
            for i in range(count):
                name = n["name"] if count == 1 else f"{n['name']}-{i}"
                gpus = int(n["gpus"])
                nodes.append(NodeInfo(name, gpus, int(n.get("gpusFree", gpus)), int(n["gpuMemoryMiB"]), str(n.get("gpuProduct", ""))))
    return nodes


class PlanCommand(BaseModel):
    """Dry run: show how the operator would pack FineTuneTasks onto GPUs (no cluster needed)."""

    tasks: CliPositionalArg[list[Path]] = Field(description="FineTuneTask YAML files (several documents per file are fine)")
    nodes: Path = Field(description=INVENTORY_HELP)
    basemodels: list[Path] = Field(default_factory=list, description="BaseModel YAML files (size figures for model:NAME)")
    groups: list[Path] = Field(default_factory=list, description="Existing BackboneGroup YAMLs; their member tasks count as placed")
    sharing_policy: Literal["never", "opt-in", "always"] = Field("opt-in", description="May tasks of different namespaces share a group")
    shared_namespace: str = Field("muxtune-system", description="Namespace of groups shared by several namespaces")
    max_tasks_per_group: int = Field(32, gt=0, description="Most tasks in one group")
    format: Literal["text", "json", "yaml"] = Field("text", description="Output format")

    def run(self) -> dict:
        import yaml

        from muxtune.api.loader import load_task_files
        from muxtune.operator.planner import PlannerConfig, TaskRequest, plan
        from muxtune.operator.world import basemodel_architecture, group_state

        tasks = load_task_files(self.tasks)
        reqs = {t.key: TaskRequest.from_task(t) for t in tasks}
        bms = {}
        for p in self.basemodels:
            for doc in yaml.safe_load_all(Path(p).read_text()):
                if doc and doc.get("kind") == "BaseModel":
                    bms[doc["metadata"]["name"]] = basemodel_architecture(doc)
        states, members = [], set()
        for p in self.groups:
            for doc in yaml.safe_load_all(Path(p).read_text()):
                if not doc or doc.get("kind") != "BackboneGroup":
                    continue
                doc["metadata"].setdefault("namespace", "default")
                keys = [f"{m['namespace']}/{m['name']}" for m in (doc.get("spec") or {}).get("tasks") or []]
                members.update(keys)
                states.append(group_state(doc, [reqs[k] for k in keys if k in reqs], 0, True))
        pending = [r for k, r in reqs.items() if k not in members and not next(t for t in tasks if t.key == k).spec.suspend]
        cfg = PlannerConfig(sharing_policy=self.sharing_policy, shared_namespace=self.shared_namespace,
                            max_tasks_per_group=self.max_tasks_per_group)
        return plan(pending, states, load_inventory(self.nodes), bms, cfg).to_dict()

    def cli_cmd(self) -> None:
        import json

        import yaml

        from muxtune.api.loader import SpecError

        try:
            out = self.run()
        except (SpecError, OSError, KeyError, ValueError) as exc:
            print(f"plan: {exc}", file=sys.stderr)
            sys.exit(2)
        if self.format == "json":
            print(json.dumps(out, indent=2))
        elif self.format == "yaml":
            print(yaml.safe_dump(out, sort_keys=False), end="")
        else:
            print(render_plan(out))
        sys.exit(1 if out["unplaceable"] else 0)


def render_plan(out: dict) -> str:
    lines = []
    hdr = f"{'GROUP':<22} {'NAMESPACE':<16} {'BACKBONE':<24} {'GPUS':>4} {'DPxTPxPP':>9} {'GPU':<24} {'MEM/GPU':>12}  TASKS"
    lines.append(hdr)
    for g in out["groups"]:
        par = g["parallelism"]
        mem = f"{g['memoryPerGpuMiB']:.0f}/{g['gpuMemoryMiB']}Mi"
        tag = "" if g["new"] else " (existing)"
        lines.append(f"{g['name']:<22} {g['namespace']:<16} {g['baseModel']:<24} {g['gpus']:>4} "
                     f"{par['dp']}x{par['tp']}x{par['pp']:<5} {g['gpuProduct'][:24]:<24} {mem:>12}  "
                     f"{', '.join(g['members'])}{tag}")
    for u in out["unplaceable"]:
        lines.append(f"unplaceable {u['task']}: {u['reason']}: {u['message']}")
    lines.append(f"GPUs: {out['gpusAllocated']} allocated ({out['gpusNew']} new), lower bound {out['lowerBoundGpus']}; "
                 f"packing efficiency {out['packingEfficiency']:.2f}")
    return "\n".join(lines)


class OperatorCommand(BaseModel):
    """Run the operator: FineTuneTasks -> BackboneGroups -> engine Pods, with status flowing back."""

    namespaces: list[str] = Field(default_factory=list, description="Namespaces to watch (comma-separated); empty: all")
    sharing_policy: Literal["never", "opt-in", "always"] = Field(
        "opt-in", description="never; opt-in (tasks that both set spec.shareAcrossNamespaces); always")
    shared_namespace: str | None = Field(None, description="Namespace of shared groups (default: $POD_NAMESPACE or muxtune-system)")
    operator_namespace: str | None = Field(None, description="Namespace of the operator's pods, allowed to reach engines' metrics port (default: $POD_NAMESPACE or the shared namespace)")
    monitoring_namespace: str | None = Field(None, description="Prometheus's namespace: the only one (with the operator) allowed to reach engines' metrics port")
    metrics_port: int = Field(8080, ge=0, le=65535, description="Prometheus /metrics port (0: off)")
    engine_image: str = Field("ghcr.io/muxtune/engine:0.1.0", description="Image of the engine pods")
    engine_metrics_port: int = Field(9400, gt=0, le=65535, description="Engine /metrics and /v1/status port")
    engine_cpu_request: str = Field("2", description="CPU request of an engine pod")
    engine_memory_request: str = Field("16Gi", description="Memory request of an engine pod")
    engine_limits: dict[str, str] = Field(default_factory=dict, description="Resource limits of an engine pod (JSON), e.g. {\"memory\":\"32Gi\"}")
    engine_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Engine image pull policy")
    engine_image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets (in each group's namespace) to pull the engine image")
    engine_service_account: str = Field("muxtune-engine", description="ServiceAccount of engine pods (created without bindings or token where missing)")
    engine_tolerations: list[dict] = Field(default_factory=list, description="Extra tolerations of engine pods (JSON list)")
    engine_node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of engine pods (JSON)")
    engine_affinity: dict = Field(default_factory=dict, description="Affinity of engine pods (JSON); the plan's GPU terms are added")
    engine_priority_classes: list[dict] = Field(
        default_factory=list,
        description="spec.priority bands to PriorityClasses (JSON list of {minPriority, className}); a group's pods "
                    "get the class of the highest band its members reach")
    engine_pdb: bool = Field(True, description="A PodDisruptionBudget per group (minAvailable: all its pods)")
    namespace_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Fair-share weights of namespaces when GPUs are short (JSON {namespace: weight}; default 1)")
    min_slo_ttft_ms: float | None = Field(None, gt=0, description="Floor of spec.serving.sloTtftMs: tighter tasks stay Pending")
    min_slo_tpot_ms: float | None = Field(None, gt=0, description="Floor of spec.serving.sloTpotMs: tighter tasks stay Pending")
    data_pvc: str | None = Field(None, description="Shared PVC of training data; a pod mounts subPath <ns> of each member namespace at /data/<ns>, read-only")
    data_host_path: str | None = Field(None, description="Host directory used like --data-pvc")
    data_pvc_per_namespace: str | None = Field(None, description="Claim name of each namespace's own data volume (shared groups: <name>-<ns> in the shared namespace)")
    output_pvc: str | None = Field(None, description="Shared PVC of outputs; a pod mounts subPath <ns> of each member namespace at /output/<ns>")
    output_host_path: str | None = Field(None, description="Host directory used like --output-pvc")
    output_pvc_per_namespace: str | None = Field(None, description="Claim name of each namespace's own output volume (shared groups: <name>-<ns> in the shared namespace)")
    transfer_image: str = Field("ghcr.io/muxtune/operator:0.1.0", description="Image of the staging, export and model-cache Jobs (torch-free)")
    model_cache_pvc: str | None = Field(None, description="PVC that hf:// and s3:// BaseModels are staged into once; groups mount the model's directory read-only")
    mlflow_tracking_uri: str | None = Field(None, description="MLFLOW_TRACKING_URI of engine pods (training.reportTo: mlflow)")
    max_dataset_bytes: int = Field(DEFAULT_MAX_FILE_BYTES, gt=0, description="Largest s3:// object a staging Job copies "
                                   "(a task's dataset.maxBytes may lower it, not raise it); engine pods read up to it")
    ephemeral_output: bool = Field(False, description="Allow running without output storage (an emptyDir per pod: adapters are LOST with the pod; throwaway clusters only)")
    poll_interval: float = Field(10.0, gt=0, description="Seconds between /v1/status polls of each group")
    poll_pod_ip: bool = Field(True, description="Poll engines at their pod IP")
    dev_endpoint_annotation: bool = Field(False, description="DEVELOPMENT ONLY: poll at a pod's muxtune.io/engine-endpoint annotation, "
                                                             "which anyone who may edit pods can set")
    unreachable_after: int = Field(3, gt=0, description="Failed polls in a row before a task shows EngineReachable=False")
    signing_key_file: str | None = Field(None, description="Master key of the per-group HMAC keys (default: random per process)")
    status_token_file: str | None = Field(None, description="Bearer token of the engines' /metrics and /v1/status, shared with "
                                                            "Prometheus (default: random per process)")
    pod_backoff_base: float = Field(2.0, gt=0, description="Seconds before retrying a refused pod creation; doubles per attempt")
    pod_backoff_cap: float = Field(300.0, gt=0, description="Longest wait between refused pod creations")
    leader_elect: bool = Field(True, description="Elect a leader over a Lease in the shared namespace (several replicas)")
    lease_duration: float = Field(15.0, gt=0, description="Seconds a leader's Lease lasts without renewal")
    lease_renew_interval: float = Field(2.0, gt=0, description="Seconds between Lease renewals and acquisition attempts")
    max_tasks_per_group: int = Field(32, gt=0, description="Most tasks in one group")
    activation_scale: float = Field(1.0, gt=0, description="Multiplies the memory model's activations (lower it when the "
                                                           "engine saves less, e.g. under activation recomputation)")
    max_dp: int = Field(8, ge=1, description="Most data-parallel pods of one group (used only when no single-pod layout fits)")
    max_group_restarts: int = Field(6, ge=0, description="Whole-group restarts after a lost or failed pod before its tasks fail")
    repack_max_moves: int = Field(8, ge=0, description="Most tasks one repack pass moves between groups, through their "
                                                       "checkpoints, after tasks finish (0: no repacking)")
    repack_interval: float = Field(60.0, gt=0, description="Least seconds between two repack passes")
    repack_task_cooldown: float = Field(600.0, ge=0, description="Seconds a moved task is not moved again")
    api_concurrency: int = Field(16, gt=0, description="Kubernetes API writes in flight at once")
    standalone: bool = Field(True, description="kopf without peering (one replica)")
    kubeconfig: str | None = Field(None, description="Kubeconfig (default: $KUBECONFIG, then in-cluster)")
    liveness_port: int | None = Field(None, description="Serve kopf's /healthz on this port")
    log_level: Literal["debug", "info", "warning", "error"] = Field("warning", description="Log verbosity (JSON lines on stderr)")

    def to_config(self):
        from muxtune.operator.config import OperatorConfig

        shared = self.shared_namespace or os.environ.get("POD_NAMESPACE") or "muxtune-system"
        return OperatorConfig(
            namespaces=[n for item in self.namespaces for n in item.split(",") if n],
            sharing_policy=self.sharing_policy,
            shared_namespace=shared,
            metrics_port=self.metrics_port,
            operator_namespace=self.operator_namespace or os.environ.get("POD_NAMESPACE") or shared,
            monitoring_namespace=self.monitoring_namespace,
            ephemeral_output=self.ephemeral_output,
            engine_image=self.engine_image,
            engine_metrics_port=self.engine_metrics_port,
            engine_cpu_request=self.engine_cpu_request,
            engine_memory_request=self.engine_memory_request,
            engine_limits=self.engine_limits,
            engine_image_pull_policy=self.engine_image_pull_policy,
            engine_image_pull_secrets=self.engine_image_pull_secrets,
            engine_service_account=self.engine_service_account,
            engine_tolerations=self.engine_tolerations,
            engine_node_selector=self.engine_node_selector,
            engine_affinity=self.engine_affinity,
            engine_priority_classes=self.engine_priority_classes,
            engine_pdb=self.engine_pdb,
            namespace_weights=self.namespace_weights,
            min_slo_ttft_ms=self.min_slo_ttft_ms,
            min_slo_tpot_ms=self.min_slo_tpot_ms,
            data_pvc=self.data_pvc,
            data_host_path=self.data_host_path,
            data_pvc_per_namespace=self.data_pvc_per_namespace,
            output_pvc=self.output_pvc,
            output_host_path=self.output_host_path,
            output_pvc_per_namespace=self.output_pvc_per_namespace,
            transfer_image=self.transfer_image,
            model_cache_pvc=self.model_cache_pvc,
            mlflow_tracking_uri=self.mlflow_tracking_uri,
            max_dataset_bytes=self.max_dataset_bytes,
            poll_interval=self.poll_interval,
            poll_pod_ip=self.poll_pod_ip,
            dev_endpoint_annotation=self.dev_endpoint_annotation,
            unreachable_after=self.unreachable_after,
            signing_key_file=self.signing_key_file,
            status_token_file=self.status_token_file,
            pod_backoff_base=self.pod_backoff_base,
            pod_backoff_cap=self.pod_backoff_cap,
            leader_elect=self.leader_elect,
            lease_duration=self.lease_duration,
            lease_renew_interval=self.lease_renew_interval,
            max_tasks_per_group=self.max_tasks_per_group,
            activation_scale=self.activation_scale,
            max_dp=self.max_dp,
            max_group_restarts=self.max_group_restarts,
            repack_max_moves=self.repack_max_moves,
            repack_interval=self.repack_interval,
            repack_task_cooldown=self.repack_task_cooldown,
            api_concurrency=self.api_concurrency,
            kubeconfig=self.kubeconfig,
            log_level=self.log_level,
        )

    def cli_cmd(self) -> None:
        import kopf

        from muxtune.operator import handlers

        cfg = self.to_config()
        if cfg.output_problem():
            print(f"error: {cfg.output_problem()}", file=sys.stderr)
            sys.exit(2)
        from muxtune.operator.keys import load_status_token

        cfg.status_token = load_status_token(cfg.status_token_file)  # read when it runs, not when parsed
        handlers.CONFIG = cfg
        from muxtune import logs

        logs.configure(self.log_level, extra={"kopf": "debug" if self.log_level == "debug" else "warning",
                                              "aiohttp": "warning"})
        namespaces = sorted(set(cfg.namespaces) | {cfg.shared_namespace}) if cfg.namespaces else []
        kopf.run(
            standalone=self.standalone,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=f"http://0.0.0.0:{self.liveness_port}/healthz" if self.liveness_port else None,
        )


def main(argv: list[str] | None = None) -> None:
    from pydantic_settings import BaseSettings, CliApp, CliSubCommand, SettingsConfigDict

    class OperatorCli(BaseSettings):
        """muxtune operator commands."""

        model_config = SettingsConfigDict(cli_prog_name="muxtune-operator", cli_kebab_case=True,
                                          cli_implicit_flags=True, cli_parse_args=False)
        plan: CliSubCommand[PlanCommand]
        operator: CliSubCommand[OperatorCommand]

        def cli_cmd(self) -> None:
            CliApp.run_subcommand(self)

    from muxtune.clihelp import run_cli

    run_cli(OperatorCli, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
