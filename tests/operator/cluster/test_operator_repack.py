"""Repack passes in the controller, against the dev cluster: when tasks finish (here: deleted), a
group whose remaining members fit another group of their class is drained into it through the
checkpoints: it is torn down, its tasks wait (Repacking) until its pods are gone, then join the
other group, whose pods keep running. That the moved task's step sequence continues exactly is
the engine's side (tests/engine/resume/test_repack_resume.py); here no engine runs (kwok)."""
from __future__ import annotations

import pytest

from tests.helpers.cluster import apply, kjson, task_manifest, wait_for

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]
# three tasks a group, so that six make two groups; repack passes a second apart
OPERATOR_ARGS = ["--max-tasks-per-group", "3", "--repack-interval", "1"]


def groups(info, ns) -> dict[str, set[str]]:
    return {g["metadata"]["name"]: {t["name"] for t in g["spec"]["tasks"]}
            for g in kjson(info, "get", "backbonegroups", "-n", ns)["items"] if not g["metadata"].get("deletionTimestamp")}


def pods(info, ns, group) -> list[str]:
    return [p["metadata"]["uid"] for p in kjson(info, "get", "pods", "-n", ns, "-l", f"muxtune.io/group={group}")["items"]]


def test_a_half_empty_group_is_drained_into_another(operator_env):
    info, ns, op = operator_env["info"], operator_env["a"], operator_env["op"]
    apply(info, *[task_manifest(f"t{i}", ns, steps=100000) for i in range(6)])
    before = wait_for(lambda: (g := groups(info, ns)) and sum(map(len, g.values())) == 6 and all(
        pods(info, ns, n) for n in g) and g, 120, what="six tasks in groups with pods")
    assert sorted(map(len, before.values())) == [3, 3], before
    donor, target = sorted(before)
    receiver_pods = wait_for(lambda: pods(info, ns, target), 30, what="the receiver's pods")
    finished = sorted(before[donor])[:2] + sorted(before[target])[:1]
    info.kubectl("delete", "ftt", "-n", ns, *finished)  # tasks that finished leave their groups
    moved = sorted(before[donor] - set(finished))
    after = wait_for(lambda: (g := groups(info, ns)) and list(g) == [target] and set(moved) <= g[target] and g,
                     120, what="the donor drained into the other group")
    assert after[target] == (before[target] - set(finished)) | set(moved)
    assert pods(info, ns, target) == receiver_pods  # a hot add: the receiver's pods were not restarted
    assert not pods(info, ns, donor)
    assert f"repack: {ns}/{moved[0]} moves from group {donor} to {target}" in op.log_text()
    assert op.log_text().count("repack: ") == len(moved)  # one pass, whole group, nothing moved twice
    info.kubectl("delete", "ftt", "--all", "-n", ns, "--wait=false")
