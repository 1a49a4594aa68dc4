"""The dev cluster's certificates (openssl CLI) and the kubeconfigs that carry them."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

SERVICE_IP = "10.96.0.1"


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
