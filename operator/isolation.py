"""Who may reach a group's engine: its NetworkPolicy and the per-namespace serving tokens.

NetworkPolicy ``<group>`` (every group, single-namespace or shared): the engine pods accept
* from the group's own pods, any port (torch.distributed's store and rank links of dp > 1);
* on the serving port, only from the member namespaces' pods (``muxtune.io/namespaces``, or the
  group's own namespace);
* on the metrics port (/metrics, /v1/status), only from the operator's pods and from the
  monitoring namespace (Prometheus; the chart's ``monitoring.namespace``).
Everything else is dropped where the CNI enforces NetworkPolicy.

Serving tokens: each tenant namespace has one bearer token,
``HMAC(master, "serving-token/<namespace>")`` (operator/keys.py), so the operator never reads a
Secret back. It is written into Secret ``muxtune-serving-token`` (key ``token``) of the tenant's
namespace, where the namespace's `edit` users read it and no other tenant can; the group's pods
get only the SHA-256 digests of their member namespaces' tokens (Secret ``<group>-serving-tokens``
in the group's namespace, file ``tokens.json``, mounted read-only), which the engine checks
(engine/serve/tenant_auth.py). A leaked token is replaced by rotating the master key.
"""
from __future__ import annotations

import json

from muxtune.facts.trust import token_digest

from muxtune.operator.config import (
    LABEL_COMPONENT,
    LABEL_GROUP,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    SERVING_PORT,
    SERVING_TOKENS_FILE,
    OperatorConfig,
)
from muxtune.operator.podspec import serving_tokens_secret_name

SERVING_TOKEN_SECRET = "muxtune-serving-token"  # in each tenant namespace whose tasks serve
SERVING_TOKEN_KEY = "token"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace
OPERATOR_POD_LABELS = {"app.kubernetes.io/component": "operator"}  # the chart's operator pods


def _meta(group: dict, name: str) -> dict:
    from muxtune.operator.resources import group_labels, owner_reference

    return {"name": name, "namespace": group["metadata"]["namespace"],
            "labels": group_labels(group["metadata"]["name"]), "ownerReferences": [owner_reference(group)]}


def _namespace_peer(namespaces: list[str]) -> dict:
    return {"namespaceSelector": {"matchExpressions": [
        {"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": sorted(namespaces)}]}}


def network_policy_manifest(group: dict, config: OperatorConfig, namespaces: list[str]) -> dict:
    """``namespaces``: the group's member namespaces (podspec.group_namespaces)."""
    name = group["metadata"]["name"]
    selector = {"matchLabels": {LABEL_GROUP: name, LABEL_COMPONENT: "engine"}}
    metrics_peers = [{**_namespace_peer([config.operator_namespace]), "podSelector": {"matchLabels": OPERATOR_POD_LABELS}}]
    if config.monitoring_namespace:
        metrics_peers.append(_namespace_peer([config.monitoring_namespace]))
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(group, name),
        "spec": {
            "podSelector": selector,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": selector}]},
                {"from": [_namespace_peer(namespaces)], "ports": [{"port": SERVING_PORT, "protocol": "TCP"}]},
                {"from": metrics_peers, "ports": [{"port": config.engine_metrics_port, "protocol": "TCP"}]},
            ],
        },
    }


def tenant_token_secret_manifest(namespace: str, token: str) -> dict:
    """The namespace's serving token, for its own users (no owner: it outlives any one group)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SERVING_TOKEN_SECRET, "namespace": namespace, "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
        "type": "Opaque",
        "stringData": {SERVING_TOKEN_KEY: token},
    }


def token_digests(tokens: dict[str, str]) -> str:
    """{namespace: token} -> the engine's file: {sha256(token): namespace}."""
    return json.dumps({token_digest(t): ns for ns, t in sorted(tokens.items())}, sort_keys=True)


def serving_tokens_secret_manifest(group: dict, tokens: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(group, serving_tokens_secret_name(group)),
            "type": "Opaque", "stringData": {SERVING_TOKENS_FILE: token_digests(tokens)}}
