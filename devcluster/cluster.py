"""A local Kubernetes control plane on 127.0.0.1 with simulated (kwok) GPU nodes.

Real etcd, kube-apiserver (Node,RBAC authorization, ServiceAccount tokens),
kube-controller-manager (garbage collector, serviceaccount controllers, ...),
kube-scheduler, and kwok, which plays the kubelet for nodes annotated
``kwok.x-k8s.io/node=fake`` so that scheduled pods become Running.  No
containers run anywhere.

Usage::

    python -m muxtune.devcluster.cluster up [--gpu-nodes 2] [--state-dir DIR]
    python -m muxtune.devcluster.cluster status
    python -m muxtune.devcluster.cluster down

``up`` prints the kubeconfig path as the last line of stdout, so
``export KUBECONFIG=$(python -m muxtune.devcluster.cluster up | tail -1)`` works.
The default state dir is ``$MUXTUNE_DEV_CLUSTER_DIR`` or
``~/.cache/muxtune/dev-cluster``; certificates, kubeconfigs, etcd data, logs
and pids all live there.  Processes run detached (own session), so the cluster
outlives the command that started it; ``down`` stops them and removes the dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from muxtune.devcluster import build as _build
from muxtune.devcluster.pki import SERVICE_IP, _b64, _make_pki, _openssl, _write_kubeconfig, issue_cert  # noqa: F401
from muxtune.devcluster.procs import (  # noqa: F401 - kueue.py and tests use these through this module
    _CHILDREN, COMPONENTS, _free_ports, _get, _insecure_ctx, _log, _log_tail, _pid_alive, _read_pids, _reap, _spawn,
    _ssl_ctx, _stop_pids, _wait,
)
from muxtune.devcluster.tools import KubectlError, apply_crds, apply_manifests, helm, kubectl  # noqa: F401

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_MEMORY_MIB = 81559
SERVICE_CIDR = "10.96.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


def default_state_dir() -> Path:
    env = os.environ.get("MUXTUNE_DEV_CLUSTER_DIR")
    return Path(env).expanduser() if env else _build.cache_dir() / "dev-cluster"


@dataclass
class ClusterInfo:
    """Handle on a running dev cluster (serialised as ``cluster.json`` in the state dir)."""

    state_dir: Path
    kubeconfig: Path  # admin (system:masters) kubeconfig, certs embedded
    server: str  # https://127.0.0.1:<port>
    version: str  # kube-apiserver gitVersion, e.g. v1.34.4
    ca_cert: Path
    gpu_nodes: list[str] = field(default_factory=list)
    cpu_nodes: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    bin_dir: Path = field(default_factory=_build.bin_dir)

    @property
    def nodes(self) -> list[str]:
        return self.gpu_nodes + self.cpu_nodes

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with KUBECONFIG set and the cluster's bin dir first in PATH."""
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        """Run the cluster's kubectl against this cluster (see :func:`kubectl`)."""
        kw.setdefault("kubeconfig", self.kubeconfig)
        return kubectl(*args, **kw)

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ClusterInfo":
        d = json.loads(text)
        for k in ("state_dir", "kubeconfig", "ca_cert", "bin_dir"):
            d[k] = Path(d[k])
        return cls(**d)


# --------------------------------------------------------------------------- helpers


def service_account_kubeconfig(
    info: ClusterInfo,
    namespace: str,
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    duration: str = "24h",
    create: bool = False,
) -> Path:
    """Write a kubeconfig that authenticates as ServiceAccount ``namespace/name``.

    The token comes from the TokenRequest API (``kubectl create token``), so it
    is a real, audience-bound, expiring SA token checked by the apiserver; RBAC
    applies to it as it would in-cluster.  With ``create=True`` the SA is
    created if missing.
    """
    if create:
        p = info.kubectl("create", "serviceaccount", name, "-n", namespace, check=False)
        if p.returncode != 0 and "AlreadyExists" not in p.stderr:
            raise RuntimeError(p.stderr)
    token = info.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}").stdout.strip()
    path = Path(path) if path else info.state_dir / "kubeconfigs" / f"sa-{namespace}-{name}.kubeconfig"
    path.parent.mkdir(parents=True, exist_ok=True)
    user = f"system:serviceaccount:{namespace}:{name}"
    _write_kubeconfig(path, info.server, info.ca_cert.read_bytes(), user, {"token": token}, namespace=namespace)
    return path


def wait_for_default_service_account(info: ClusterInfo, namespace: str, timeout: float = 30) -> None:
    """Wait until the controller-manager created ``namespace``'s ``default`` ServiceAccount
    (until then the ServiceAccount admission plugin rejects pods in a new namespace)."""
    deadline = time.monotonic() + timeout
    while True:
        p = info.kubectl("get", "serviceaccount", "default", "-n", namespace, "-o", "name", check=False)
        if p.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no default ServiceAccount in namespace {namespace} after {timeout}s: {p.stderr.strip()}")
        time.sleep(0.2)




def _healthy(info: ClusterInfo) -> bool:
    pids = _read_pids(info.state_dir)
    if not set(COMPONENTS) <= set(pids) or not all(_pid_alive(pids[n], info.state_dir) for n in COMPONENTS):
        return False
    code, _ = _get(f"{info.server}/readyz", _ssl_ctx(info.state_dir))
    return code == 200


# --------------------------------------------------------------------------- nodes


def node_manifest(
    name: str,
    *,
    gpus: int = 8,
    cpu: str = "96",
    memory: str = "1024Gi",
    pods: int = 110,
    gpu_product: str = GPU_PRODUCT,
    gpu_memory_mib: int = GPU_MEMORY_MIB,
    labels: dict[str, str] | None = None,
    taints: list[dict] | None = None,
) -> dict:
    """A kwok-managed Node object; ``gpus > 0`` adds ``nvidia.com/gpu`` and GFD-style labels."""
    resources = {"cpu": cpu, "memory": memory, "pods": str(pods), "ephemeral-storage": "1Ti"}
    lbls = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": name,
        "type": "kwok",
    }
    if gpus > 0:
        resources[GPU_RESOURCE] = str(gpus)
        lbls.update({
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": gpu_product,
            "nvidia.com/gpu.memory": str(gpu_memory_mib),
            "nvidia.com/gpu.count": str(gpus),
        })
    lbls.update(labels or {})
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": lbls,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints or []},
        # Nodes accept status on create; kwok's node-initialize stage keeps capacity/allocatable.
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }
    return node


def add_nodes(info: ClusterInfo, nodes: Sequence[dict], *, wait: bool = True, timeout: float = 60) -> list[str]:
    """Create (or replace) kwok nodes from :func:`node_manifest` dicts; wait until Ready."""
    names = [n["metadata"]["name"] for n in nodes]
    for n in nodes:
        # create (not apply): status is only taken from the create call
        p = info.kubectl("create", "-f", "-", input=json.dumps(n), check=False)
        if p.returncode != 0 and "AlreadyExists" not in p.stderr:
            raise RuntimeError(f"creating node {n['metadata']['name']}: {p.stderr}")
    if wait and names:
        info.kubectl("wait", "--for=condition=Ready", f"--timeout={int(timeout)}s", *[f"node/{n}" for n in names], timeout=timeout + 10)
    return names


# --------------------------------------------------------------------------- up/down/status


def load(state_dir: str | os.PathLike[str] | None = None) -> ClusterInfo | None:
    """The handle of the cluster in ``state_dir`` (default: the default state dir), or None."""
    return _load(Path(state_dir or default_state_dir()))


def _load(state_dir: Path) -> ClusterInfo | None:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return ClusterInfo.from_json((state_dir / "cluster.json").read_text())
    return None


def up(
    state_dir: str | os.PathLike[str] | None = None,
    gpu_nodes: int = 2,
    *,
    gpus_per_node: int = 8,
    cpu_nodes: int = 0,
    node_cpu: str = "96",
    node_memory: str = "1024Gi",
    build: bool = True,
    timeout: float = 120,
    kueue: bool = False,
) -> ClusterInfo:
    """Start the dev cluster in ``state_dir`` (or reuse the healthy one already running there).

    Creates ``gpu_nodes`` kwok nodes ``kwok-gpu-<i>`` with ``gpus_per_node``
    ``nvidia.com/gpu`` each and ``cpu_nodes`` GPU-less nodes ``kwok-cpu-<i>``,
    and waits until they are Ready and the ``default`` ServiceAccount exists.
    ``build`` builds missing binaries first (see :mod:`muxtune.devcluster.build`).
    ``kueue`` also starts Kueue there (:func:`muxtune.devcluster.kueue.ensure`; built on first use).
    """
    state_dir = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()
    t0 = time.monotonic()
    if build:
        _build.ensure_binaries()
    else:
        missing = _build.missing_binaries()
        if missing:
            raise RuntimeError(f"binaries missing: {missing}; run python -m muxtune.devcluster.build")

    info = _load(state_dir)
    if info is not None and _healthy(info):
        _log(f"reusing running cluster in {state_dir} ({info.server})")
    else:
        if state_dir.exists() and any(state_dir.iterdir()):
            _log(f"removing stale state in {state_dir}")
            down(state_dir, keep=True, quiet=True)
            for child in state_dir.iterdir():  # keep the dir itself (a watchdog may be watching it)
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        info = _start(state_dir, timeout=timeout)

    want_gpu = [f"kwok-gpu-{i}" for i in range(gpu_nodes)]
    want_cpu = [f"kwok-cpu-{i}" for i in range(cpu_nodes)]
    manifests = [
        node_manifest(n, gpus=gpus_per_node, cpu=node_cpu, memory=node_memory) for n in want_gpu if n not in info.gpu_nodes
    ] + [node_manifest(n, gpus=0, cpu=node_cpu, memory=node_memory) for n in want_cpu if n not in info.cpu_nodes]
    if manifests:
        add_nodes(info, manifests, timeout=timeout)
        info.gpu_nodes = sorted(set(info.gpu_nodes) | set(want_gpu))
        info.cpu_nodes = sorted(set(info.cpu_nodes) | set(want_cpu))
        (state_dir / "cluster.json").write_text(info.to_json())
    if kueue:
        from muxtune.devcluster import kueue as _kueue

        _kueue.ensure(info, build=build, timeout=max(timeout, 180))
    _log(f"cluster ready in {time.monotonic() - t0:.1f}s: {info.server} {info.version}, nodes {info.nodes}")
    return info


def _start(state_dir: Path, timeout: float) -> ClusterInfo:
    """Certificates, kubeconfigs, then each component in dependency order; all stopped if one fails."""
    t0 = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True)
    pki = state_dir / "pki"
    _make_pki(pki)
    _log(f"certificates generated in {time.monotonic() - t0:.1f}s")
    etcd_port, etcd_peer, api_port, cm_port, sched_port = _free_ports(5)
    ports = {"etcd": etcd_port, "etcd-peer": etcd_peer, "kube-apiserver": api_port,
             "kube-controller-manager": cm_port, "kube-scheduler": sched_port}
    server = f"https://127.0.0.1:{api_port}"
    kc = _write_kubeconfigs(state_dir, pki, server)

    pids: dict[str, int] = {}  # filled as components start, so a failure stops exactly those
    try:
        _start_etcd(state_dir, ports, timeout, pids)
        ctx = _start_apiserver(state_dir, pki, ports, server, timeout, pids)
        _log(f"kube-apiserver ready at {server} ({time.monotonic() - t0:.1f}s)")
        _start_controllers(state_dir, pki, kc, ports, timeout, pids)
        code, body = _get(f"{server}/version", ctx)
        version = json.loads(body)["gitVersion"] if code == 200 else "unknown"
        info = ClusterInfo(
            state_dir=state_dir, kubeconfig=kc["top-level"], server=server, version=version, ca_cert=pki / "ca.crt",
            pids=pids, ports=ports,
        )
        (state_dir / "cluster.json").write_text(info.to_json())
        _wait_default_service_account(info, timeout)
        if not _pid_alive(pids["kwok"], state_dir):
            raise RuntimeError(f"kwok exited:\n{_log_tail(state_dir, 'kwok')}")
    except BaseException:
        _log(f"start failed; stopping components (logs kept in {state_dir / 'logs'})")
        _stop_pids(state_dir, pids)
        raise
    _log(f"control plane up in {time.monotonic() - t0:.1f}s")
    return info


def _write_kubeconfigs(state_dir: Path, pki: Path, server: str) -> dict[str, Path]:
    """One client-certificate kubeconfig per user, plus ``top-level``: the admin copy that `up` prints."""
    (state_dir / "kubeconfigs").mkdir(exist_ok=True)
    ca = (pki / "ca.crt").read_bytes()
    kc = {}
    for user in ("admin", "controller-manager", "scheduler", "kwok"):
        kc[user] = state_dir / "kubeconfigs" / f"{user}.kubeconfig"
        _write_kubeconfig(
            kc[user], server, ca, user,
            {"client-certificate-data": _b64((pki / f"{user}.crt").read_bytes()), "client-key-data": _b64((pki / f"{user}.key").read_bytes())},
        )
    kc["top-level"] = state_dir / "kubeconfig"
    shutil.copy2(kc["admin"], kc["top-level"])
    return kc


def _start_etcd(state_dir: Path, ports: dict[str, int], timeout: float, pids: dict[str, int]) -> None:
    etcd_port, etcd_peer = ports["etcd"], ports["etcd-peer"]
    pids["etcd"] = _spawn("etcd", [
        "--name=muxtune-dev",
        f"--data-dir={state_dir / 'etcd'}",
        f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
        f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
        f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
        f"--initial-cluster=muxtune-dev=http://127.0.0.1:{etcd_peer}",
        "--auto-compaction-retention=1",
        "--unsafe-no-fsync=true",  # throwaway dev data; makes the apiserver much faster on slow disks
        "--log-level=warn",
    ], state_dir)
    _wait(
        "etcd /health",
        lambda: (lambda r: (r[0] == 200 and '"true"' in r[1], r))(_get(f"http://127.0.0.1:{etcd_port}/health")),
        timeout, state_dir, "etcd", pids["etcd"],
    )


def _start_apiserver(state_dir: Path, pki: Path, ports: dict[str, int], server: str, timeout: float, pids: dict[str, int]):
    """Start kube-apiserver, wait for /readyz, and return the SSL context that trusts its CA."""
    pids["kube-apiserver"] = _spawn("kube-apiserver", [
        f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={ports['kube-apiserver']}",
        f"--cert-dir={pki}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        "--authorization-mode=Node,RBAC",
        f"--service-account-issuer={SA_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        "--profiling=false",
        "--enable-priority-and-fairness=false",
        "--event-ttl=1h",
    ], state_dir)
    ctx = _ssl_ctx(state_dir)
    _wait(
        "kube-apiserver /readyz",
        lambda: (lambda r: (r[0] == 200, r))(_get(f"{server}/readyz", ctx)),
        timeout, state_dir, "kube-apiserver", pids["kube-apiserver"],
    )
    return ctx


def _start_controllers(
    state_dir: Path, pki: Path, kc: dict[str, Path], ports: dict[str, int], timeout: float, pids: dict[str, int],
) -> None:
    """kube-controller-manager, kube-scheduler and kwok; waits for the first two to be healthy."""
    cm_port, sched_port = ports["kube-controller-manager"], ports["kube-scheduler"]
    pids["kube-controller-manager"] = _spawn("kube-controller-manager", [
        f"--kubeconfig={kc['controller-manager']}",
        f"--authentication-kubeconfig={kc['controller-manager']}",
        f"--authorization-kubeconfig={kc['controller-manager']}",
        "--bind-address=127.0.0.1",
        f"--secure-port={cm_port}",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        "--cluster-name=muxtune-dev",
        "--controllers=*",
        "--profiling=false",
    ], state_dir)
    pids["kube-scheduler"] = _spawn("kube-scheduler", [
        f"--kubeconfig={kc['scheduler']}",
        f"--authentication-kubeconfig={kc['scheduler']}",
        f"--authorization-kubeconfig={kc['scheduler']}",
        "--bind-address=127.0.0.1",
        f"--secure-port={sched_port}",
        "--leader-elect=false",
        "--profiling=false",
    ], state_dir)
    pids["kwok"] = _spawn("kwok", [
        f"--kubeconfig={kc['kwok']}",
        f"--config={_build.kwok_stages_path()}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
        "--node-lease-duration-seconds=40",
        "--cidr=10.244.0.0/16",
        "--node-ip=127.0.0.1",
    ], state_dir)
    insecure = _insecure_ctx()
    for name, port in (("kube-controller-manager", cm_port), ("kube-scheduler", sched_port)):
        _wait(
            f"{name} /healthz",
            lambda port=port: (lambda r: (r[0] == 200, r))(_get(f"https://127.0.0.1:{port}/healthz", insecure)),
            timeout, state_dir, name, pids[name],
        )


def _wait_default_service_account(info: ClusterInfo, timeout: float) -> None:
    """The serviceaccount controller must have made the default SA, or the admission plugin rejects pods."""
    def default_sa() -> tuple[bool, str]:
        p = info.kubectl("get", "serviceaccount", "default", "-n", "default", "-o", "name", check=False)
        return p.returncode == 0, p.stderr.strip()

    _wait("the default ServiceAccount", default_sa, timeout, info.state_dir, "kube-controller-manager",
          info.pids["kube-controller-manager"])


def down(state_dir: str | os.PathLike[str] | None = None, *, keep: bool = False, quiet: bool = False) -> None:
    """Stop every component started in ``state_dir`` and remove it (unless ``keep``)."""
    state_dir = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()
    pids = _read_pids(state_dir)
    info = _load(state_dir)
    if info:
        for k, v in info.pids.items():
            pids.setdefault(k, v)
    if pids:
        _stop_pids(state_dir, pids)
        if not quiet:
            _log(f"stopped {', '.join(sorted(pids))}")
    if not keep and state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)
        if not quiet:
            _log(f"removed {state_dir}")


def spawn_reaper(state_dir: str | os.PathLike[str], watch_pid: int | None = None) -> int:
    """Start a detached watchdog that runs :func:`down` on ``state_dir`` once ``watch_pid``
    (default: this process) is gone, so a killed test run leaves no cluster behind.
    It exits by itself when the state dir disappears (a normal ``down``)."""
    state_dir = Path(state_dir).expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)  # the watchdog exits when it disappears
    watch_pid = watch_pid or os.getpid()
    proc = subprocess.Popen(
        [sys.executable, "-m", "muxtune.devcluster.cluster", f"--state-dir={state_dir}", "reap-when-dead", str(watch_pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )
    _CHILDREN.append(proc)
    return proc.pid


def _reap_when_dead(state_dir: Path, pid: int) -> int:
    while state_dir.exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            down(state_dir, quiet=True)
            return 0
        except PermissionError:
            pass
        time.sleep(1)
    return 0


def status(state_dir: str | os.PathLike[str] | None = None) -> dict:
    """``{"state_dir", "running", "ready", "server", "components": {name: {"pid", "alive"}}}``."""
    state_dir = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()
    info = _load(state_dir)
    pids = _read_pids(state_dir)
    names = list(COMPONENTS) + [n for n in pids if n not in COMPONENTS]  # add-ons (kueue) when started
    comps = {n: {"pid": pids.get(n), "alive": bool(pids.get(n)) and _pid_alive(pids[n], state_dir)} for n in names}
    ready = False
    if info is not None and comps["kube-apiserver"]["alive"]:
        ready = _get(f"{info.server}/readyz", _ssl_ctx(state_dir))[0] == 200
    return {
        "state_dir": str(state_dir),
        "running": all(c["alive"] for c in comps.values()),
        "ready": ready,
        "server": info.server if info else None,
        "kubeconfig": str(info.kubeconfig) if info else None,
        "version": info.version if info else None,
        "nodes": info.nodes if info else [],
        "components": comps,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m muxtune.devcluster.cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--state-dir", default=None, help=f"default: $MUXTUNE_DEV_CLUSTER_DIR or {default_state_dir()}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start (or reuse) the cluster; prints the kubeconfig path last")
    u.add_argument("--gpu-nodes", type=int, default=2)
    u.add_argument("--gpus-per-node", type=int, default=8)
    u.add_argument("--cpu-nodes", type=int, default=0)
    u.add_argument("--timeout", type=float, default=120)
    u.add_argument("--kueue", action="store_true", help="also start Kueue (built on first use)")
    sub.add_parser("down", help="stop the cluster and delete its state dir")
    sub.add_parser("status", help="print component status as JSON; exit 1 unless running and ready")
    sub.add_parser("kubeconfig", help="print the admin kubeconfig path")
    r = sub.add_parser("reap-when-dead", help=argparse.SUPPRESS)
    r.add_argument("pid", type=int)
    a = ap.parse_args(argv)
    if a.cmd == "up":
        info = up(a.state_dir, a.gpu_nodes, gpus_per_node=a.gpus_per_node, cpu_nodes=a.cpu_nodes, timeout=a.timeout,
                  kueue=a.kueue)
        print(f"server: {info.server}\nversion: {info.version}\nnodes: {' '.join(info.nodes)}")
        print(info.kubeconfig)
        return 0
    if a.cmd == "down":
        down(a.state_dir)
        return 0
    if a.cmd == "status":
        st = status(a.state_dir)
        print(json.dumps(st, indent=2))
        return 0 if st["running"] and st["ready"] else 1
    if a.cmd == "reap-when-dead":
        return _reap_when_dead(Path(a.state_dir), a.pid)
    if a.cmd == "kubeconfig":
        info = _load(Path(a.state_dir).expanduser().resolve() if a.state_dir else default_state_dir())
        if info is None:
            print("no cluster", file=sys.stderr)
            return 1
        print(info.kubeconfig)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
