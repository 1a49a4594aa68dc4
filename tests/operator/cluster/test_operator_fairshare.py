"""Priority preemption against the dev cluster: when one namespace's tasks hold every GPU, a
higher-priority task of another namespace takes one lower-priority group's place."""
from __future__ import annotations

import pytest

from tests.helpers.cluster import apply, kjson, task_manifest, wait_for

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]
OPERATOR_ARGS = ["--max-tasks-per-group", "1"]  # one task per group: each task holds a GPU


def reasons(info, ns) -> dict[str, str]:
    """Task name -> phase, or the reason it is Pending."""
    out = {}
    for t in kjson(info, "get", "finetunetasks", "-n", ns)["items"]:
        st = t.get("status") or {}
        placed = {c["type"]: c for c in st.get("conditions") or []}.get("Placed") or {}
        out[t["metadata"]["name"]] = placed.get("reason") if st.get("phase") == "Pending" else st.get("phase")
    return out


def test_a_higher_priority_task_preempts_a_lower_priority_group(operator_env):
    info, a, b = operator_env["info"], operator_env["a"], operator_env["b"]
    gpus = len(info.gpu_nodes) * 8
    apply(info, *[task_manifest(f"bulk-{i}", a, steps=100000) for i in range(gpus + 2)])
    def settled():
        r = reasons(info, a)
        return r if "Placed" in r.values() and not {None, "Queued"} & set(r.values()) \
            and set(r.values()) != {"Placed"} else None

    before = wait_for(settled, 120, what="team-a holding every free GPU")
    assert set(before.values()) == {"Placed", "WaitingForGpus"}, before

    apply(info, task_manifest("urgent", b, priority=1000))

    def preempted():
        evs = kjson(info, "get", "events", "-n", a)["items"]
        return [e for e in evs if e["reason"] == "Preempted"]

    evs = wait_for(preempted, 60, what="a Preempted Event in team-a")
    victim = evs[0]["involvedObject"]["name"]
    assert before[victim] == "Placed" and f"{b}/urgent (priority 1000)" in evs[0]["message"]
    wait_for(lambda: reasons(info, b).get("urgent") == "Placed", 90, what="urgent placed")
    # one group was released for it, not more; the victim waits for GPUs, to resume from its checkpoint
    after = reasons(info, a)
    assert sum(v == "Placed" for v in after.values()) == sum(v == "Placed" for v in before.values()) - 1
    assert after[victim] in ("WaitingForGpus", "Preempted")
    info.kubectl("delete", "ftt", "--all", "-n", a, "--wait=false")
    info.kubectl("delete", "ftt", "--all", "-n", b, "--wait=false")
