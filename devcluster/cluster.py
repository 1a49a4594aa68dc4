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
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

try:  # works both as muxtune.devcluster.cluster and as a plain script
    from muxtune.devcluster import build as _build
except ImportError:  # pragma: no cover - `python devcluster/cluster.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build as _build  # type: ignore[no-redef]

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_MEMORY_MIB = 81559
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
# start order; teardown is the reverse
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def default_state_dir() -> Path:
    env = os.environ.get("MUXTUNE_DEV_CLUSTER_DIR")
    return Path(env).expanduser() if env else _build.cache_dir() / "dev-cluster"


def _log(msg: str) -> None:
    print(f"[muxtune.devcluster] {msg}", file=sys.stderr, flush=True)


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


def _run_tool(name: str, args, kubeconfig, input: str | None, check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a binary built by :mod:`muxtune.devcluster.build` (text mode, output captured);
    raises KubectlError, whose message carries stderr, when ``check`` and it fails."""
    exe = _build.bin_path(name)
    if not exe.exists():
        _build.ensure_binaries([name])
    cmd = [str(exe)]
    if kubeconfig is not None:
        cmd.append(f"--kubeconfig={kubeconfig}")
    cmd += list(args)
    # no input: stdin is /dev/null, so a tool never waits on the caller's terminal
    p = subprocess.run(cmd, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise KubectlError(p.returncode, cmd, p.stdout, p.stderr)
    return p


def kubectl(
    *args: str,
    kubeconfig: str | os.PathLike[str] | None = None,
    input: str | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run the kubectl built by :mod:`muxtune.devcluster.build`."""
    return _run_tool("kubectl", args, kubeconfig, input, check, timeout)


def helm(
    *args: str,
    kubeconfig: str | os.PathLike[str] | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run the helm (v3) built by :mod:`muxtune.devcluster.build`; same contract as :func:`kubectl`."""
    return _run_tool("helm", args, kubeconfig, None, check, timeout)


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl (or helm) call; ``str()`` includes the tool's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


def apply_manifests(
    manifests: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    kubeconfig: str | os.PathLike[str],
    server_side: bool = True,
) -> str:
    """``kubectl apply`` YAML text, or file/dir path(s). Returns kubectl's stdout."""
    if isinstance(manifests, str) and ("\n" in manifests or manifests.lstrip().startswith(("apiVersion", "{", "---"))):
        args = ["apply", "-f", "-"]
        stdin = manifests
    else:
        paths = [manifests] if isinstance(manifests, (str, os.PathLike)) else list(manifests)
        args = ["apply"] + [a for p in paths for a in ("-f", str(p))]
        stdin = None
    if server_side:
        args += ["--server-side", "--force-conflicts", "--field-manager=muxtune-devcluster"]
    return kubectl(*args, kubeconfig=kubeconfig, input=stdin).stdout


def apply_crds(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    kubeconfig: str | os.PathLike[str],
    timeout: float = 60,
) -> list[str]:
    """Apply CRD manifests (files/dirs/YAML text) and wait until they are Established.

    Returns the CRD names (``crd.group`` form).
    """
    out = apply_manifests(paths, kubeconfig=kubeconfig)
    names = []
    for line in out.splitlines():
        ref = line.split()[0] if line.strip() else ""
        if ref.startswith("customresourcedefinition.apiextensions.k8s.io/"):
            names.append(ref.split("/", 1)[1])
    deadline = time.monotonic() + timeout
    while names:
        p = kubectl(
            "wait", "--for=condition=Established", f"--timeout={int(timeout)}s",
            *[f"crd/{n}" for n in names], kubeconfig=kubeconfig, timeout=timeout + 10, check=False,
        )
        if p.returncode == 0:
            break
        # a CRD the apiserver has not given a status yet makes `kubectl wait` fail at once
        if "accessor error" not in p.stderr or time.monotonic() > deadline:
            raise KubectlError(p.returncode, p.args, p.stdout, p.stderr)
        time.sleep(0.3)
    return names


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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _write_kubeconfig(
    path: Path, server: str, ca_pem: bytes, user: str, creds: dict[str, str], namespace: str = "default"
) -> None:
    # JSON is valid YAML; kubectl, client-go, kopf and the python client all read it.
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "muxtune-dev", "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "muxtune-dev", "context": {"cluster": "muxtune-dev", "user": user, "namespace": namespace}}],
        "current-context": "muxtune-dev",
        "preferences": {},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)


# --------------------------------------------------------------------------- PKI (openssl CLI)


def _openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {p.stderr}")


def issue_cert(pki: Path, name: str, subject: str, eku: str, san: str | None = None, *, days: str = "3650") -> tuple[Path, Path]:
    """Sign ``<name>.crt`` / ``<name>.key`` in ``pki`` with the cluster CA (``ca.crt``/``ca.key`` there).

    ``eku`` is ``serverAuth`` or ``clientAuth``; ``san`` an openssl subjectAltName value
    (``IP:127.0.0.1,DNS:localhost``); an ``O=system:masters`` subject makes a cluster admin.
    """
    _openssl("req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
    ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment", f"extendedKeyUsage={eku}"]
    if san:
        ext.append(f"subjectAltName={san}")
    (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-sha256", "-days", days, "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=pki,
    )
    (pki / f"{name}.csr").unlink()
    (pki / f"{name}.ext").unlink()
    (pki / f"{name}.key").chmod(0o600)
    return pki / f"{name}.crt", pki / f"{name}.key"


def _make_pki(pki: Path) -> None:
    """CA, apiserver serving cert, client certs, service-account key pair."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to generate the dev cluster's certificates")
    pki.mkdir(parents=True, exist_ok=True)
    days = "3650"
    _openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-sha256", "-days", days,
        "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=muxtune-dev-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki,
    )
    san = ",".join(
        ["IP:127.0.0.1", f"IP:{SERVICE_IP}", "DNS:localhost"]
        + [f"DNS:{d}" for d in ("kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")]
    )
    leaves = {
        # name: (subject, extendedKeyUsage, subjectAltName)
        "apiserver": ("/CN=kube-apiserver", "serverAuth", san),
        "admin": ("/O=system:masters/CN=muxtune-admin", "clientAuth", None),
        "controller-manager": ("/CN=system:kube-controller-manager", "clientAuth", None),
        "scheduler": ("/CN=system:kube-scheduler", "clientAuth", None),
        "kwok": ("/O=system:masters/CN=kwok", "clientAuth", None),
    }
    for name, (subj, eku, alt) in leaves.items():
        issue_cert(pki, name, subj, eku, alt, days=days)
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=pki)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for f in pki.glob("*.key"):
        f.chmod(0o600)


# --------------------------------------------------------------------------- processes


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pid_alive(pid: int, state_dir: Path) -> bool:
    """True if ``pid`` runs and is one of ours.

    Children of this process are asked directly (``Popen.poll``); other pids
    (read back from pid files) must be alive, not zombies, and have the state
    dir in their command line, so a recycled pid is never mistaken for ours.
    """
    for p in _CHILDREN:
        if p.pid == pid:
            return p.poll() is None
    for attempt in range(10):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):  # zombie / dead
            return False
        if cmdline:
            return str(state_dir).encode() in cmdline
        time.sleep(0.02 * (attempt + 1))  # empty while the process is exec()ing
    return False


def _spawn(name: str, args: list[str], state_dir: Path, env: dict[str, str] | None = None) -> int:
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    exe = str(_build.bin_path(name))
    with open(logs / f"{name}.log", "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {exe} {' '.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [exe, *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=state_dir, start_new_session=True, close_fds=True, env=env,
        )
    (state_dir / "pids").mkdir(exist_ok=True)
    (state_dir / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")
    # keep a reference so that Python's child reaper does not warn; the process
    # lives on in its own session after we exit.
    _CHILDREN.append(proc)
    return proc.pid


_CHILDREN: list[subprocess.Popen] = []


def _log_tail(state_dir: Path, name: str, lines: int = 30) -> str:
    try:
        return "".join((state_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return "(no log)"


def _read_pids(state_dir: Path) -> dict[str, int]:
    """Every component's pid file: the control plane's and add-ons' (Kueue)."""
    pids = {}
    names = list(COMPONENTS) + sorted(f.stem for f in (state_dir / "pids").glob("*.pid") if f.stem not in COMPONENTS)
    for name in names:
        f = state_dir / "pids" / f"{name}.pid"
        with contextlib.suppress(OSError, ValueError):
            pids[name] = int(f.read_text().strip())
    return pids


def _stop_pids(state_dir: Path, pids: dict[str, int], timeout: float = 20) -> None:
    """SIGTERM components in reverse start order, one tier at a time (clients, then the
    apiserver, then etcd) so each can shut down cleanly; SIGKILL after ``timeout``."""
    order = [n for n in reversed(COMPONENTS) if n in pids] + [n for n in pids if n not in COMPONENTS]
    tiers = [
        [n for n in order if n not in ("kube-apiserver", "etcd")],
        [n for n in order if n == "kube-apiserver"],
        [n for n in order if n == "etcd"],
    ]
    for tier in tiers:
        for name in tier:
            if _pid_alive(pids[name], state_dir):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pids[name], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in tier:
            pid = pids[name]
            while _pid_alive(pid, state_dir) and time.monotonic() < deadline:
                _reap()
                time.sleep(0.05)
            if _pid_alive(pid, state_dir):
                _log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f}s; killing")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
    _reap()


def _reap() -> None:
    for p in list(_CHILDREN):
        if p.poll() is not None:
            _CHILDREN.remove(p)


# --------------------------------------------------------------------------- HTTP probes


def _ssl_ctx(state_dir: Path) -> ssl.SSLContext:
    pki = state_dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def _get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 3) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, ssl.SSLError) as e:
        return 0, str(e)


def _insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _wait(what: str, cond, timeout: float, state_dir: Path, component: str, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = cond()
        if ok:
            return
        if pid is not None and not _pid_alive(pid, state_dir):
            raise RuntimeError(f"{component} exited while waiting for {what}:\n{_log_tail(state_dir, component)}")
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last}):\n{_log_tail(state_dir, component)}")


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
    t0 = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "kubeconfigs").mkdir(exist_ok=True)
    pki = state_dir / "pki"
    _make_pki(pki)
    _log(f"certificates generated in {time.monotonic() - t0:.1f}s")
    etcd_port, etcd_peer, api_port, cm_port, sched_port = _free_ports(5)
    server = f"https://127.0.0.1:{api_port}"
    ca = (pki / "ca.crt").read_bytes()
    kc = {}
    for user in ("admin", "controller-manager", "scheduler", "kwok"):
        kc[user] = state_dir / "kubeconfigs" / f"{user}.kubeconfig"
        _write_kubeconfig(
            kc[user], server, ca, user,
            {"client-certificate-data": _b64((pki / f"{user}.crt").read_bytes()), "client-key-data": _b64((pki / f"{user}.key").read_bytes())},
        )
    # top-level copy of the admin kubeconfig: the path that `up` prints
    admin_kc = state_dir / "kubeconfig"
    shutil.copy2(kc["admin"], admin_kc)

    pids: dict[str, int] = {}
    try:
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
        pids["kube-apiserver"] = _spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
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
        _log(f"kube-apiserver ready at {server} ({time.monotonic() - t0:.1f}s)")
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
        code, body = _get(f"{server}/version", ctx)
        version = json.loads(body)["gitVersion"] if code == 200 else "unknown"
        info = ClusterInfo(
            state_dir=state_dir, kubeconfig=admin_kc, server=server, version=version, ca_cert=pki / "ca.crt",
            pids=pids, ports={"etcd": etcd_port, "etcd-peer": etcd_peer, "kube-apiserver": api_port,
                              "kube-controller-manager": cm_port, "kube-scheduler": sched_port},
        )
        (state_dir / "cluster.json").write_text(info.to_json())

        # the serviceaccount controller (controller-manager) must have made the default SA,
        # otherwise the ServiceAccount admission plugin rejects pods
        def default_sa() -> tuple[bool, str]:
            p = info.kubectl("get", "serviceaccount", "default", "-n", "default", "-o", "name", check=False)
            return p.returncode == 0, p.stderr.strip()

        _wait("the default ServiceAccount", default_sa, timeout, state_dir, "kube-controller-manager", pids["kube-controller-manager"])
        if not _pid_alive(pids["kwok"], state_dir):
            raise RuntimeError(f"kwok exited:\n{_log_tail(state_dir, 'kwok')}")
    except BaseException:
        _log(f"start failed; stopping components (logs kept in {state_dir / 'logs'})")
        _stop_pids(state_dir, pids)
        raise
    _log(f"control plane up in {time.monotonic() - t0:.1f}s")
    return info


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
        [sys.executable, str(Path(__file__).resolve()), f"--state-dir={state_dir}", "reap-when-dead", str(watch_pid)],
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
