"""`muxtune dev-cluster`: the local control plane for development and tests."""
from __future__ import annotations

import json
import shlex
import signal
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
        # stderr: scripts read the kubeconfig path from stdout's last line
        print(f"kubectl and helm: eval \"$(muxtune dev-cluster env{_state_flag(self.state_dir)})\"", file=sys.stderr)
        print(info.kubeconfig)


def _state_flag(state_dir: Path | None) -> str:
    return f" --state-dir {shlex.quote(str(state_dir))}" if state_dir else ""


class EnvCommand(_StateDir):
    """Print shell lines putting the cluster's kubectl and helm on PATH and its kubeconfig in
    KUBECONFIG: eval "$(muxtune dev-cluster env)"."""

    def cli_cmd(self) -> None:
        from muxtune.devcluster.cluster import load

        info = load(self.state_dir)
        if info is None:
            print("no dev cluster in that state dir: run `muxtune dev-cluster up` first", file=sys.stderr)
            sys.exit(1)
        print(f"export PATH={shlex.quote(str(info.bin_dir))}:\"$PATH\"")
        print(f"export KUBECONFIG={shlex.quote(str(info.kubeconfig))}")


class HostEnginesCommand(_StateDir):
    """Run the cluster's engine pods on this host (kwok nodes run no containers), until Ctrl-C.
    The operator must run with --dev-endpoint-annotation --no-poll-pod-ip. Development only."""

    data: Path = Field(description="Host directory standing for the data volume: DATA/<namespace>/<dataset.path>")
    output: Path = Field(description="Host directory standing for the output volume: OUTPUT/<namespace>/<task>")
    device: str = Field("cpu", description="--device of the engines")

    def cli_cmd(self) -> None:
        from muxtune.devcluster.cluster import load
        from muxtune.devcluster.hostengines import HostEngines

        info = load(self.state_dir)
        if info is None:
            print("no dev cluster in that state dir: run `muxtune dev-cluster up` first", file=sys.stderr)
            sys.exit(1)
        engines = HostEngines(info.kubectl, self.data.resolve(), self.output.resolve(), info.state_dir / "host-engines",
                              self.device)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the engines (they checkpoint) and leave
        try:
            engines.run()
        except KeyboardInterrupt:
            pass


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
    env: CliSubCommand[EnvCommand] = Field(description="print the PATH and KUBECONFIG exports for its kubectl and helm")
    host_engines: CliSubCommand[HostEnginesCommand] = Field(description="run its engine pods on this host (kwok runs none)")
    build: CliSubCommand[BuildCommand] = Field(description="build the binaries only")

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)
