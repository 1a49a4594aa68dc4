"""Fixtures for the operator's cluster tests (helpers: tests/helpers/cluster.py)."""
from __future__ import annotations

import uuid

import pytest

from tests.helpers.cluster import OperatorProcess, ensure_crds, install_rbac


@pytest.fixture(scope="module")
def operator_env(kube_cluster, tmp_path_factory, request):
    """CRDs, the chart's namespaced RBAC, two tenant namespaces, and the operator running as the
    chart's ServiceAccount (watching only those namespaces). Yields a dict of handles. A test module
    may set OPERATOR_ARGS (extra flags) and OPERATOR_DEV_ENDPOINT (default True)."""
    tag = uuid.uuid4().hex[:6]
    system, ns_a, ns_b = f"mtsys-{tag}", f"team-a-{tag}", f"team-b-{tag}"
    for ns in (system, ns_a, ns_b):
        kube_cluster.kubectl("create", "namespace", ns)
    from muxtune.devcluster import cluster

    for ns in (system, ns_a, ns_b):
        cluster.wait_for_default_service_account(kube_cluster, ns)
    ensure_crds(kube_cluster)
    sa_kubeconfig = install_rbac(kube_cluster, system, watch=[ns_a, ns_b])
    logdir = tmp_path_factory.mktemp("operator")
    op = OperatorProcess(sa_kubeconfig, [ns_a, ns_b], system, logdir / "operator.log",
                         extra=list(getattr(request.module, "OPERATOR_ARGS", [])),
                         dev_endpoint=getattr(request.module, "OPERATOR_DEV_ENDPOINT", True))
    op.start()
    env = {"info": kube_cluster, "op": op, "system": system, "a": ns_a, "b": ns_b, "tmp": logdir}
    try:
        yield env
    finally:
        env["op"].stop()
        print("---- operator log (tail) ----\n" + "\n".join(env["op"].log_text().splitlines()[-60:]))
        for ns in (ns_a, ns_b, system):
            kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
