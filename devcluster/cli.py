"""`muxtune dev-cluster`: the local control plane for development and tests."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import CliApp, CliSubCommand


class _StateDir(BaseModel):
    state_dir: Path | None = Field(None, description="Cluster state (default: $MUXTUNE_DEV_CLUSTER_DIR or ~/.cache/muxtune/dev-cluster)")


class UpCommand(_StateDir):
    """Build the binaries if needed (Go module proxy, cached), start or reuse the cluster; prints the kubeconfig path last."""

    gpu_nodes: int = Field(2, ge=0, description="kwok nodes with nvidia.com/gpu capacity")
    gpus_per_node: int = Field(8, gt=0, description="nvidia.com/gpu per node")
    cpu_nodes: int = Field(0, ge=0, description="kwok nodes without GPUs")
    timeout: float = Field(120, gt=0, description="Seconds to wait for readiness")
    kueue: bool = Field(False, description="Also start Kueue (pod integration, namespaces labelled kueue-managed=true); built on first use")

    def cli_cmd(self) -> None:
        from muxtune.devcluster.cluster import up

        info = up(self.state_dir, self.gpu_nodes, gpus_per_node=self.gpus_per_node,
                  cpu_nodes=self.cpu_nodes, timeout=self.timeout, kueue=self.kueue)
        print(f"server: {info.server}\nversion: {info.version}\nnodes: {' '.join(info.nodes)}")
        print(info.kubeconfig)


class DownCommand(_StateDir):
    """Stop the cluster and delete its state."""

    def cli_cmd(self) -> None:
        from muxtune.devcluster.cluster import down

        down(self.state_dir)


class StatusCommand(_StateDir):
    """Component status as JSON; exit 1 unless running and ready."""

    def cli_cmd(self) -> None:
        from muxtune.devcluster.cluster import status

        st = status(self.state_dir)
        print(json.dumps(st, indent=2))
        sys.exit(0 if st["running"] and st["ready"] else 1)


class BuildCommand(BaseModel):
    """Build (once, cached under ~/.cache/muxtune) kube-apiserver, scheduler, controller-manager, kubectl, etcd, kwok, helm."""

    force: bool = Field(False, description="Rebuild even when cached")
    kueue: bool = Field(False, description="Also build Kueue (not needed by the default cluster)")

    def cli_cmd(self) -> None:
        from muxtune.devcluster.build import DEFAULT_BINARIES, ensure_binaries

        names = list(DEFAULT_BINARIES) + (["kueue"] if self.kueue else [])
        for name, path in sorted(ensure_binaries(names, force=self.force).items()):
            print(f"{name}\t{path}")


class DevClusterCommand(BaseModel):
    """A local Kubernetes control plane with kwok GPU nodes (no Docker needed)."""

    up: CliSubCommand[UpCommand] = Field(description="start (or reuse) the cluster")
    down: CliSubCommand[DownCommand] = Field(description="stop it and delete its state")
    status: CliSubCommand[StatusCommand] = Field(description="print component status")
    build: CliSubCommand[BuildCommand] = Field(description="build the binaries only")

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)
