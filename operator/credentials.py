"""The operator's Kubernetes identity, loaded by the `kubernetes` package's own loaders.

``kubernetes.config`` understands every kubeconfig form (tokens, token files, client certificates,
``exec`` credential plugins as EKS/GKE use them) and the in-cluster ServiceAccount, and refreshes
exec and projected tokens before they expire through ``Configuration.refresh_api_key_hook``. The
operator's aiohttp client and kopf's login both read from one :class:`KubeCredentials`, so they
speak as the same identity.

The loader writes inline certificate data to temporary files. Here they go into a private
directory (0700) and are read into memory and deleted at once, so no credential file outlives
a load: Python's ``ssl`` needs a file only for the moment a client certificate is loaded
(:meth:`ssl_context`, and kopf does the same), and nothing is left in /tmp after a start.
"""
from __future__ import annotations

import os
import shutil
import ssl
import tempfile
import threading
from pathlib import Path

from kubernetes import client as kclient
from kubernetes.config import incluster_config, kube_config

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def _first_kubeconfig(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if env:
        return env
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists():
        return None  # in-cluster
    default = Path(kube_config.KUBE_CONFIG_DEFAULT_LOCATION).expanduser()
    return str(default) if default.exists() else None


class KubeCredentials:
    """Server, TLS material (in memory) and a bearer token that is refreshed before it expires."""

    def __init__(self, kubeconfig: str | None = None):
        self.config = kclient.Configuration()
        self._lock = threading.Lock()
        self._dir = tempfile.mkdtemp(prefix="muxtune-kube-")  # 0700; emptied after every load
        self.ca_data = self.cert_data = self.key_data = None
        self.namespace: str | None = None
        path = _first_kubeconfig(kubeconfig)
        try:
            if path is None:
                incluster_config.load_incluster_config(client_configuration=self.config)
                ns_file = SA_DIR / "namespace"
                self.namespace = ns_file.read_text().strip() if ns_file.exists() else None
            else:
                kube_config.load_kube_config(config_file=path, client_configuration=self.config,
                                             persist_config=False, temp_file_path=self._dir)
                _, current = kube_config.list_kube_config_contexts(config_file=path)
                self.namespace = ((current or {}).get("context") or {}).get("namespace")
            self._absorb()
        except BaseException:
            self.close()
            raise

    @property
    def server(self) -> str:
        return self.config.host.rstrip("/")

    @property
    def insecure(self) -> bool:
        return not self.config.verify_ssl

    def _absorb(self) -> None:
        """Read the TLS files the loader wrote into memory, then delete the ones in our directory."""
        ours = set()
        for attr, field in (("ssl_ca_cert", "ca_data"), ("cert_file", "cert_data"), ("key_file", "key_data")):
            p = getattr(self.config, attr, None)
            if p and os.path.isfile(p):
                setattr(self, field, Path(p).read_bytes())
                if os.path.dirname(os.path.abspath(p)) == os.path.abspath(self._dir):
                    ours.add(p)
        for p in ours:
            os.unlink(p)
            for k in [k for k, v in kube_config._temp_files.items() if v == p]:
                del kube_config._temp_files[k]  # else the loader would hand out the deleted path again

    def token(self) -> str | None:
        """The bearer token, refreshed first when the loader says it expires (exec plugins,
        projected ServiceAccount tokens)."""
        with self._lock:
            hook = self.config.refresh_api_key_hook
            if hook is not None:
                os.makedirs(self._dir, mode=0o700, exist_ok=True)
                hook(self.config)
                self._absorb()
            raw = self.config.api_key.get("BearerToken") or self.config.api_key.get("authorization")
        if not raw:
            return None
        scheme, _, tok = raw.partition(" ")
        return tok if scheme.lower() == "bearer" and tok else raw

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cadata=self.ca_data.decode()) if self.ca_data else ssl.create_default_context()
        if self.cert_data and self.key_data:
            fd, tmp = tempfile.mkstemp(dir=self._dir)  # ssl reads a client key only from a file
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self.cert_data + b"\n" + self.key_data)
                ctx.load_cert_chain(tmp)
            finally:
                os.unlink(tmp)
        return ctx

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
