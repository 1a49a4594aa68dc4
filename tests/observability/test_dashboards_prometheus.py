"""Every dashboard query, proven by a real Prometheus scraping a real engine run (and the operator).

Debian's `prometheus` runs on loopback (1 s scrapes, temporary storage, the chart's alert rules
loaded) and scrapes:

* a real `muxtune run --watch --metrics-port --serve-port` over builtin:tiny-llama: three tasks in
  two namespaces that train to Succeeded under a token budget small enough that they take turns, and
  one whose dataset is missing, so failure panels have a real failure to show; while they train, a
  client sends completion requests (plain and streamed) for their adapters and the base model, so the
  serving row has real requests to show. Its target carries
  the labels a Kubernetes scrape gives an engine pod (namespace, pod, group), with honor_labels as
  the chart's PodMonitor sets it;
* the operator, when the local cluster harness is there (muxtune.devcluster's `kube_cluster`): it
  runs against the loopback control plane with the same four tasks applied, packs them into one
  BackboneGroup, and polls the real engine above through the group pod's
  muxtune.io/engine-endpoint annotation, so tasks reach Running/Succeeded/Failed in the cluster;
* a stand-in for NVIDIA's dcgm-exporter: DCGM_FI_* lines in the exporter's format and Kubernetes
  pod mapping, for the engine pod's GPUs plus one GPU no muxtune pod uses. A CPU run has no GPU,
  so this is the only source for the DCGM join; queries naming DCGM_FI_* are answered by it and
  nothing else (the engine's own muxtune_engine_gpu_* fallback branches return nothing on a CPU
  run; test_metric_names checks their names).

Then every query of every panel and every template variable, with variables substituted by
values found through the API ("All" and one concrete value each), goes through /api/v1 and the
test fails on any query that errors or returns no series. Queries naming muxtune_operator_*
metrics are checked in their own test, which skips (with the reason) only when the cluster
harness is unavailable.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import uuid

import pytest
import yaml

from tests.helpers.promstack import (
    ALERTS, REPO, SERVE_PORT, STEPS,
    DcgmStandIn, Prometheus, ServingClient, Stack, operator_caught_up_error, place_group, start_engine,
    start_operator, start_prometheus, stop_process, tail, task_docs, wait_for, wait_training_scraped,
)

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.slow]

DASHBOARDS = REPO / "dashboards"
# Grafana's built-in interval variables, as a dashboard over the last few minutes would set them
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "10m", "__range_s": "600", "__interval_ms": "15000"}
VAR = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*),\s*)?([A-Za-z_]\w*)\s*\)\s*$", re.S)


@pytest.fixture(scope="module")
def stack(request, prometheus_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("observability")
    tag = uuid.uuid4().hex[:6]
    procs: list[subprocess.Popen] = []
    operator, reason, error = start_operator(request, work, tag)
    dcgm = DcgmStandIn()
    try:
        ns_a, ns_b = (operator.ns_a, operator.ns_b) if operator is not None else (f"obs-a-{tag}", f"obs-b-{tag}")
        docs = task_docs(ns_a, ns_b, work)
        operator, placement, error = place_group(operator, docs, error)
        pod_ns, pod, group = placement
        engine_labels = {"namespace": pod_ns, "pod": pod, "group": group, "container": "engine"}
        dcgm.pod = {"namespace": pod_ns, "pod": pod}
        engine, port = start_engine(work, docs, operator, placement, procs)
        prom = start_prometheus(prometheus_bin, work, port, engine_labels, dcgm, operator, procs)

        def scraped_engine():
            return prom.value('count(muxtune_task_phase{phase="Failed"} == 1)') == 1

        wait_for(scraped_engine, 60, "the first scrape of the engine", interval=0.5)
        engine.write_tasks(docs, 2)
        serve_port = int(wait_for(lambda: SERVE_PORT.search(engine.log.read_text()), 120,
                                  "the engine's API server").group(1))
        client = ServingClient(serve_port, [f"{ns_a}/reverse", f"{ns_a}/copy", f"{ns_b}/arithmetic", "builtin:tiny-llama"])
        wait_training_scraped(prom, engine, docs)
        if operator is not None:
            error = operator_caught_up_error(operator, prom) or error
        client.close()
        assert len(client.served) >= 8 and {r["model"] for r in client.served} >= set(client.models), client.served
        time.sleep(3)  # a few more scrapes and rule evaluations after the end
        yield Stack(prom, docs, work / "output", engine_labels, reason, error, client.served)
    finally:
        for p in reversed(procs):
            stop_process(p)
        dcgm.close()
        if operator is not None:
            operator.close()
        for name in ("engine.log", "prometheus.log"):
            print(f"---- {name} (tail) ----\n" + tail(work / name, 20))


# ------------------------------------------------------------------------------------ queries
def substitute(expr: str, values: dict[str, str]) -> str:
    def rep(m):
        name = m.group(1) or m.group(2)
        if name in BUILTINS:
            return BUILTINS[name]
        assert name in values, f"unknown template variable ${name} in {expr}"
        return values[name]

    return VAR.sub(rep, expr)


def regex_value(values: list[str]) -> str:
    """How Grafana writes a multi-value variable into a Prometheus regex matcher."""
    esc = [re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\\\1", v) for v in values]
    return esc[0] if len(esc) == 1 else "(" + "|".join(esc) + ")"


def variable_values(prom: Prometheus, definition: str, values: dict[str, str]) -> list[str]:
    m = LABEL_VALUES.match(definition)
    assert m, f"unsupported variable query {definition!r} (the test knows label_values(selector, label))"
    selector, label = m.group(1), m.group(2)
    params = {"start": str(prom.started - 60), "end": str(time.time())}
    if selector:
        params["match[]"] = substitute(selector, values)
    body = prom.api(f"label/{label}/values", **params)
    assert body["status"] == "success", f"{definition}: {body.get('error')}"
    return sorted(body["data"])


# "one" mode selects a task that trained ("broken" failed before its first step: its loss and
# learning-rate panels rightly show no data); other variables take their first value
PREFER = {"task": "reverse"}


def resolve_variables(prom: Prometheus, dashboard: dict, mode: str) -> dict[str, str]:
    """Variables in dashboard order, each either 'All' (.*) or one concrete value found through the
    API with the variables before it substituted; every variable query must return values."""
    values: dict[str, str] = {}
    for v in dashboard["templating"]["list"]:
        if v["type"] == "datasource":
            continue
        found = variable_values(prom, v["definition"], values)
        assert found, f"{dashboard['title']}: variable ${v['name']} ({v['definition']}) has no values"
        if mode == "all":
            values[v["name"]] = v.get("allValue") or regex_value(found)
        else:
            one = PREFER.get(v["name"]) if PREFER.get(v["name"]) in found else found[0]
            values[v["name"]] = regex_value([one])
    return values


def panel_targets(dashboard: dict):
    stack = list(dashboard["panels"])
    while stack:
        p = stack.pop(0)
        stack.extend(p.get("panels", []))
        for t in p.get("targets", []):
            if not t.get("hide"):
                yield p, t


def check_dashboard(prom: Prometheus, name: str, dashboard: dict, want) -> list[str]:
    """Run every selected target in both variable modes; return the failures."""
    failures, checked = [], 0
    for mode in ("all", "one"):
        values = resolve_variables(prom, dashboard, mode)
        for panel, target in panel_targets(dashboard):
            if not want(target["expr"]):
                continue
            expr = substitute(target["expr"], values)
            checked += 1
            if target.get("instant"):
                body = prom.api("query", query=expr)
            else:  # what a time-series panel asks for: a range, over the run
                body = prom.api("query_range", query=expr, start=str(prom.started), end=str(time.time()), step="1")
            where = f"{name} / {panel['title']} / {target['refId']} [{mode}: {values}]"
            if body.get("status") != "success":
                failures.append(f"{where}: error {body.get('errorType')}: {body.get('error')}\n    {expr}")
            elif not body["data"]["result"]:
                failures.append(f"{where}: no series\n    {expr}")
    assert checked or not failures
    return failures


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def is_operator_query(expr: str) -> bool:
    return "muxtune_operator_" in expr


def test_dashboard_queries_return_series(stack):
    """Every engine (and DCGM) query of every panel returns series from the real run."""
    failures = []
    for name, d in dashboards().items():
        failures += check_dashboard(stack.prom, name, d, lambda e: not is_operator_query(e))
    assert not failures, f"{len(failures)} dashboard queries failed:\n" + "\n".join(failures)


def test_operator_dashboard_queries_return_series(stack):
    if stack.operator_error:
        pytest.fail(f"operator not scraped: {stack.operator_error}", pytrace=False)
    if stack.operator_reason:
        pytest.skip(f"operator not scraped: {stack.operator_reason}")
    failures = []
    for name, d in dashboards().items():
        failures += check_dashboard(stack.prom, name, d, is_operator_query)
    assert not failures, f"{len(failures)} operator dashboard queries failed:\n" + "\n".join(failures)
    assert any(is_operator_query(t["expr"]) for d in dashboards().values() for _, t in panel_targets(d))


def test_every_variable_query_returns_values(stack):
    for d in dashboards().values():
        resolve_variables(stack.prom, d, "one")  # asserts inside


def test_scraped_values_are_true(stack):
    """What the panels show is what the engine did: Prometheus' numbers equal the run's own
    metrics.jsonl (tokens, steps, last loss) and the effective-token counters agree."""
    prom = stack.prom
    real = 0
    for doc in stack.tasks:
        ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
        sel = f'{{namespace="{ns}", task="{name}"}}'
        if name == "broken":
            assert prom.value(f'muxtune_task_phase{{namespace="{ns}", task="{name}", phase="Failed"}}') == 1
            continue
        lines = [json.loads(line) for line in next(stack.output.rglob(f"{name}/metrics.jsonl")).read_text().splitlines()]
        assert len(lines) == STEPS
        tokens = sum(r["tokens"] for r in lines)
        real += tokens
        assert prom.value(f"muxtune_task_tokens_total{sel}") == tokens
        assert prom.value(f"muxtune_task_steps_total{sel}") == STEPS
        assert prom.value(f"muxtune_task_loss{sel}") == pytest.approx(lines[-1]["loss"])
        assert prom.value(f"muxtune_task_learning_rate{sel}") == pytest.approx(lines[-1]["lr"])
        # the loss curve has a point for (almost) every step: 1 s scrapes of a slower run
        curve = prom.api("query_range", query=f"muxtune_task_loss{sel}", start=str(prom.started),
                         end=str(time.time()), step="1")["data"]["result"]
        assert len({v for _, v in curve[0]["values"]}) >= 2
        # the series carry the pod's target labels and the task's own namespace
        (series,) = prom.query(f"muxtune_task_steps_total{sel}")
        assert series["metric"]["group"] == stack.engine_labels["group"]
        assert series["metric"]["pod"] == stack.engine_labels["pod"]
    assert prom.value("sum(muxtune_engine_real_tokens_total)") == real
    computed = prom.value("sum(muxtune_engine_computed_tokens_total)")
    assert computed >= real
    ratio = prom.value("max(muxtune_engine_effective_token_ratio)")
    assert 0 < ratio <= 1
    # the budget made tasks take turns, and the fused-each-step series saw it
    assert prom.value("sum(muxtune_task_waiting_rounds_total)") > 0
    assert prom.value("max_over_time(sum(muxtune_engine_tasks_resident)[15m:1s])") == 3
    # serving: the requests the client got answers to, and the tokens the server said it generated
    served = stack.served
    assert prom.value('sum(muxtune_serve_requests_total{outcome=~"stop|length"})') == len(served)
    assert prom.value("sum(muxtune_serve_generation_tokens_total)") == sum(r["tokens"] for r in served)
    for model in {r["model"] for r in served}:
        n = sum(1 for r in served if r["model"] == model)
        assert prom.value(f'sum(muxtune_serve_requests_total{{model="{model}"}})') == n, model
    assert prom.value('sum(muxtune_serve_slo_requests_total)') == len(served)
    # per-pod series have the pod's namespace, not a task's
    (info,) = prom.query("muxtune_engine_info")
    assert info["metric"]["namespace"] == stack.engine_labels["namespace"]
    assert info["metric"]["device"] == "cpu"


def test_alert_rules_evaluate_cleanly_and_stay_quiet(stack):
    """The rules, loaded into the real Prometheus, evaluate against real series without error,
    and a healthy run fires none of them."""
    def evaluated():
        groups = stack.prom.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = wait_for(evaluated, 30, "every rule to be evaluated")
    assert len(rules) == len([r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]])
    bad = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
    assert not bad, bad
    firing = [a for a in stack.prom.api("alerts")["data"]["alerts"]]
    assert not firing, firing
