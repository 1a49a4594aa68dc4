"""Every dashboard query, proven by a real Prometheus scraping a real engine run (and the operator).

Debian's `prometheus` runs on loopback (1 s scrapes, temporary storage, the chart's alert rules
loaded) and scrapes:

* a real `muxtune run --watch --metrics-port` over builtin:tiny-llama: three tasks in two
  namespaces that train to Succeeded under a token budget small enough that they take turns, and
  one whose dataset is missing, so failure panels have a real failure to show. Its target carries
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
import os
import re
import signal
import socket
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

pytest_plugins = ["muxtune.devcluster.fixture"]
pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
ALERTS = REPO / "charts" / "muxtune" / "files" / "alerts.yaml"
EXAMPLES = REPO / "examples" / "quickstart"
STEPS = 300  # each task Running ~11 s on a 2-core machine: several 1 s scrapes see every task Running
MIN_RUNNING_SCRAPES = 3
# Grafana's built-in interval variables, as a dashboard over the last few minutes would set them
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "10m", "__range_s": "600", "__interval_ms": "15000"}
VAR = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*),\s*)?([A-Za-z_]\w*)\s*\)\s*$", re.S)


# ------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(fn, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last one
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode([(k, v) for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])])
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with Prometheus' reason
            body = json.load(exc)
        return body

    def query(self, expr: str) -> list:
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        r = self.query(expr)
        return float(r[0]["value"][1]) if r else None


# ------------------------------------------------------------------------------------ the stack
def task_docs(ns_a: str, ns_b: str, data_dir: Path) -> list[dict]:
    def doc(name, ns, data, peft, batch, seed, max_len=48):
        return {"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": name, "namespace": ns},
                "spec": {"baseModel": "builtin:tiny-llama", "dataset": {"path": str(Path(data).relative_to(data_dir)), "maxSeqLen": max_len},
                         "peft": peft, "shareAcrossNamespaces": True,
                         "training": {"maxSteps": STEPS, "batchSize": batch, "learningRate": 1e-2, "seed": seed,
                                      "checkpointInterval": 25}}}

    lora = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}
    ia3 = {"method": "ia3", "targetModules": ["k_proj", "v_proj", "down_proj"], "feedforwardModules": ["down_proj"]}
    for name in ("reverse", "copy", "arithmetic"):  # dataset paths live under the engine's --data-root
        shutil.copyfile(EXAMPLES / f"{name}.jsonl", data_dir / f"{name}.jsonl")
    return [
        doc("reverse", ns_a, data_dir / "reverse.jsonl", lora, 4, 0),
        doc("copy", ns_a, data_dir / "copy.jsonl", {**lora, "r": 8, "alpha": 16}, 4, 1),
        doc("arithmetic", ns_b, data_dir / "arithmetic.jsonl", ia3, 8, 2, max_len=32),
        doc("broken", ns_a, data_dir / "missing.jsonl", lora, 4, 3),  # fails at setup: dataset not found
    ]


class DcgmStandIn:
    """Serves dcgm-exporter-format lines for the engine pod's GPUs (and one unrelated GPU)."""

    def __init__(self):
        self.pod: dict[str, str] = {}
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = stand_in.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def exposition(self) -> str:
        gpus = [("0", "GPU-0f6b3a52-1c1e-4a63-9b2e-3d8c1a7e0001", self.pod, 87, 41_200, 40_300),
                ("1", "GPU-0f6b3a52-1c1e-4a63-9b2e-3d8c1a7e0002", self.pod, 79, 39_900, 41_600),
                ("2", "GPU-0f6b3a52-1c1e-4a63-9b2e-3d8c1a7e0003", {}, 0, 0, 81_500)]  # no pod: not ours
        out = []
        for metric, help_, idx in (("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", 3),
                                   ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", 4),
                                   ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", 5)):
            out += [f"# HELP {metric} {help_}", f"# TYPE {metric} gauge"]
            for g in gpus:
                labels = {"gpu": g[0], "UUID": g[1], "device": f"nvidia{g[0]}", "modelName": "NVIDIA H100 80GB HBM3",
                          "Hostname": "gpu-node-1", "DCGM_FI_DRIVER_VERSION": "550.54.15"}
                if g[2]:
                    labels.update(container="engine", namespace=g[2]["namespace"], pod=g[2]["pod"])
                out.append(metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} " + str(g[idx]))
        return "\n".join(out) + "\n"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Stack:
    prom: Prometheus
    tasks: list[dict]
    output: Path
    engine_labels: dict[str, str]
    operator_reason: str | None  # why the operator is not scraped (skip)
    operator_error: str | None  # what broke while starting it (failure)


class OperatorSide:
    """The operator on the loopback cluster, with the tasks applied and packed into one group."""

    def __init__(self, info, tag: str, workdir: Path):
        from muxtune.devcluster import cluster

        self.info = info
        self.system, self.ns_a, self.ns_b = f"obs-sys-{tag}", f"obs-a-{tag}", f"obs-b-{tag}"
        for ns in (self.system, self.ns_a, self.ns_b):
            info.kubectl("create", "namespace", ns)
            cluster.wait_for_default_service_account(info, ns)
        cluster.apply_crds(REPO / "crds", kubeconfig=info.kubeconfig)
        self.port = free_port()
        self.log = workdir / "operator.log"
        env = dict(os.environ)
        env.pop("KUBECONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "muxtune.operator.cli", "operator", "--kubeconfig", str(info.kubeconfig),
             f"--namespaces={self.ns_a},{self.ns_b}", "--shared-namespace", self.system, "--sharing-policy", "always",
             "--metrics-port", str(self.port), "--no-poll-pod-ip", "--poll-interval", "1",
             "--dev-endpoint-annotation", "--signing-key-file", str(self.signing_key(workdir)), "--no-leader-elect",
             "--engine-image", "registry.invalid/muxtune/engine:test", "--log-level", "info"],
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def apply(self, docs: list[dict]) -> tuple[str, str, str]:
        """Apply the tasks; returns (namespace, pod, group) of the engine pod they were packed into."""
        self.info.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

        def group_pod():
            assert self.proc.poll() is None, "operator exited:\n" + tail(self.log)
            pods = json.loads(self.info.kubectl("get", "pods", "-A", "-l", "muxtune.io/group", "-o", "json").stdout)["items"]
            pods = [p for p in pods if p["metadata"]["namespace"] in (self.system, self.ns_a, self.ns_b)]
            return pods[0] if len(pods) == 1 else None

        pod = wait_for(group_pod, 120, "the operator to create one engine pod for the four tasks")
        meta = pod["metadata"]
        return meta["namespace"], meta["name"], meta["labels"]["muxtune.io/group"]

    @staticmethod
    def signing_key(workdir: Path) -> Path:
        path = workdir / "signing.key"
        if not path.exists():
            path.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        return path

    def group_key(self, namespace: str, group: str, workdir: Path) -> bytes:
        """The group's HMAC key, as the operator derives it (the engine signs its reports with it)."""
        from muxtune.operator.keys import GroupKeys

        g = json.loads(self.info.kubectl("get", "backbonegroup", group, "-n", namespace, "-o", "json").stdout)
        return GroupKeys(self.signing_key(workdir).read_bytes().strip()).key(g)

    def point_at_engine(self, namespace: str, pod: str, endpoint: str) -> None:
        self.info.kubectl("annotate", "pod", pod, "-n", namespace, f"muxtune.io/engine-endpoint={endpoint}", "--overwrite")

    def close(self) -> None:
        stop_process(self.proc)
        print("---- operator log (tail) ----\n" + tail(self.log))
        for ns in (self.ns_a, self.ns_b, self.system):
            self.info.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def start_operator(request, workdir: Path, tag: str) -> tuple[OperatorSide | None, str | None, str | None]:
    """(operator, why it is not there (a skip), what broke (a failure of the operator test only))."""
    if os.environ.get("MUXTUNE_OBSERVABILITY_NO_OPERATOR") == "1":
        return None, "MUXTUNE_OBSERVABILITY_NO_OPERATOR=1", None
    try:
        info = request.getfixturevalue("kube_cluster")
    except pytest.FixtureLookupError:
        return None, "the local cluster harness (muxtune.devcluster.fixture's kube_cluster) is not installed", None
    except pytest.skip.Exception as exc:
        return None, f"the local cluster harness skipped: {exc}", None
    except Exception as exc:  # noqa: BLE001 - the engine half of the proof does not depend on it
        return None, None, f"the local cluster did not start: {exc}"
    try:
        return OperatorSide(info, tag, workdir), None, None
    except Exception as exc:  # noqa: BLE001
        return None, None, f"the operator did not start: {exc}"


@pytest.fixture(scope="module")
def stack(request, prometheus_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("observability")
    tag = uuid.uuid4().hex[:6]
    procs: list[subprocess.Popen] = []
    operator, reason, error = start_operator(request, work, tag)
    dcgm = DcgmStandIn()
    try:
        if operator is not None:
            ns_a, ns_b = operator.ns_a, operator.ns_b
        else:
            ns_a, ns_b = f"obs-a-{tag}", f"obs-b-{tag}"
        docs = task_docs(ns_a, ns_b, work)
        if operator is not None:
            try:
                pod_ns, pod, group = operator.apply(docs)
            except Exception as exc:  # noqa: BLE001 - fail the operator test, go on with the engine
                error = f"the operator did not pack the tasks: {exc}"
                operator.close()
                operator = None
        if operator is None:
            pod_ns, pod, group = "muxtune-system", "obs-group-0", "obs-group"
        engine_labels = {"namespace": pod_ns, "pod": pod, "group": group, "container": "engine"}
        dcgm.pod = {"namespace": pod_ns, "pod": pod}

        # the engine: the group pod's command line, on this host
        tasks_file = work / "tasks.yaml"
        # start with only the broken task; the others join (hot add via --watch) once Prometheus
        # scrapes, so the scrapes see training in progress however fast this machine is
        engine_env = dict(os.environ)
        group_key = None
        if operator is not None:  # the engine signs its reports and checks its task file, as in a pod
            from muxtune.engine import trust

            group_key = operator.group_key(pod_ns, group, work)
            (work / "group.key").write_bytes(group_key)
            engine_env.update({"MUXTUNE_GROUP": group, "MUXTUNE_GROUP_KEY_FILE": str(work / "group.key")})

        def write_tasks(ds: list[dict], revision: int) -> None:
            text = yaml.safe_dump_all(ds)
            if group_key is not None:
                trust.signature_path(tasks_file).write_text(trust.sign_tasks(group_key, group, revision, text))
            tasks_file.write_text(text)

        write_tasks([d for d in docs if d["metadata"]["name"] == "broken"], 1)
        output = work / "output"
        engine_log = work / "engine.log"
        exe = Path(sys.executable).with_name("muxtune")
        engine = subprocess.Popen(
            [str(exe), "run", str(tasks_file), "--output", str(output), "--data-root", str(work), "--watch", "--no-progress", "--no-resume",
             "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--token-budget", "160", "--device", "cpu"],
            stdout=open(engine_log, "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=work, env=engine_env)
        procs.append(engine)

        def engine_port():
            assert engine.poll() is None, "engine exited:\n" + tail(engine_log)
            m = re.search(r"serving /metrics and /v1/status on 127\.0\.0\.1:(\d+)", engine_log.read_text())
            return int(m.group(1)) if m else None

        port = wait_for(engine_port, 120, "the engine's metrics server")
        if operator is not None:
            operator.point_at_engine(pod_ns, pod, f"http://127.0.0.1:{port}")

        # Prometheus, scraping what a cluster's Prometheus would
        scrape = [
            {"job_name": "muxtune-engine", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": engine_labels}]},
            {"job_name": "dcgm-exporter", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{dcgm.port}"],
                                 "labels": {"namespace": "gpu-operator", "pod": "nvidia-dcgm-exporter-x1"}}]},
        ]
        if operator is not None:
            scrape.append({"job_name": "muxtune-operator", "honor_labels": True,
                           "static_configs": [{"targets": [f"127.0.0.1:{operator.port}"],
                                               "labels": {"namespace": operator.system, "pod": "muxtune-operator-0"}}]})
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(ALERTS)], "scrape_configs": scrape}
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom_port = free_port()
        prom_log = work / "prometheus.log"
        prom_proc = subprocess.Popen(
            [prometheus_bin, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=open(prom_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(prom_proc)
        prom = Prometheus(f"http://127.0.0.1:{prom_port}", prom_proc, prom_log)

        def ready():
            assert prom_proc.poll() is None, "prometheus exited:\n" + tail(prom_log)
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                return r.status == 200

        wait_for(ready, 60, "prometheus to be ready")

        def scraped_engine():
            return prom.value('count(muxtune_task_phase{phase="Failed"} == 1)') == 1

        wait_for(scraped_engine, 60, "the first scrape of the engine", interval=0.5)
        write_tasks(docs, 2)

        # training done, as Prometheus saw it: three Succeeded, one Failed
        def finished():
            assert engine.poll() is None, "engine exited:\n" + tail(engine_log)
            return (prom.value('count(muxtune_task_phase{phase="Succeeded"} == 1)') == 3
                    and prom.value('count(muxtune_task_phase{phase="Failed"} == 1)') == 1)

        wait_for(finished, 600, "the engine's tasks to finish, as scraped", interval=1)
        # the panels on running tasks need scrapes that caught each one Running; a machine so fast
        # that they did not would make those queries' emptiness meaningless
        for d in docs:
            name = d["metadata"]["name"]
            if name == "broken":
                continue
            # the phase gauge is 0 or 1 per scrape, so its sum counts the scrapes that saw Running
            seen = prom.value(f'sum_over_time(muxtune_task_phase{{task="{name}",phase="Running"}}[15m])')
            assert (seen or 0) >= MIN_RUNNING_SCRAPES, (
                f"{name} was scraped Running {seen or 0} times; raise STEPS so the run outlasts a few scrapes")
        if operator is not None:
            def operator_caught_up():
                assert operator.proc.poll() is None, "operator exited:\n" + tail(operator.log)
                return (prom.value('sum(muxtune_operator_tasks{phase="Succeeded"})') == 3
                        and prom.value('sum(muxtune_operator_tasks{phase="Failed"})') == 1)

            try:
                wait_for(operator_caught_up, 120, "the operator to report the tasks' final phases", interval=1)
            except (TimeoutError, AssertionError) as exc:
                error = str(exc)
        time.sleep(3)  # a few more scrapes and rule evaluations after the end
        yield Stack(prom, docs, output, engine_labels, reason, error)
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
