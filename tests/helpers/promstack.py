"""Helpers of the real-Prometheus dashboard test (test_dashboards_prometheus.py): Prometheus on
loopback, the DCGM exporter stand-in, the serving client, the operator side, the example tasks, and
the steps that assemble them into one stack (the test's module fixture)."""
from __future__ import annotations

import json
import os
import re
import signal
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

from tests.helpers.cluster import free_port
from tests.helpers.paths import REPO

EXAMPLES = REPO / "examples" / "quickstart"
STEPS = 300  # each task Running ~11 s on a 2-core machine: several 1 s scrapes see every task Running


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
    def doc(name, ns, data, peft, batch, seed, max_len=48, **dataset):
        return {"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": name, "namespace": ns},
                "spec": {"baseModel": "builtin:tiny-llama",
                         "dataset": {"path": str(Path(data).relative_to(data_dir)), "maxSeqLen": max_len, **dataset},
                         "peft": peft, "shareAcrossNamespaces": True,
                         "training": {"maxSteps": STEPS, "batchSize": batch, "learningRate": 1e-2, "seed": seed,
                                      "checkpointInterval": 25}}}

    lora = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}
    ia3 = {"method": "ia3", "targetModules": ["k_proj", "v_proj", "down_proj"], "feedforwardModules": ["down_proj"]}
    for name in ("reverse", "copy", "arithmetic"):  # dataset paths live under the engine's --data-root
        shutil.copyfile(EXAMPLES / f"{name}.jsonl", data_dir / f"{name}.jsonl")
    return [
        doc("reverse", ns_a, data_dir / "reverse.jsonl", lora, 4, 0, validationSplit=0.1),  # eval-loss panel
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
    served: list[dict] = field(default_factory=list)  # the client's answered requests: model, completion tokens


class ServingClient:
    """Completion requests to the engine's OpenAI API while its tasks train: one every half second,
    for each served model in turn (a task's adapter answers once the task is Running), streamed
    every other time; answered ones are kept, with the tokens the server counted."""

    def __init__(self, port: int, models: list[str]):
        self.port, self.models, self.served = port, models, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        i = 0
        while not self.stop.wait(0.5):
            model = self.models[i % len(self.models)]
            body = {"model": model, "prompt": "reverse: abc\n", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "stream": i % 2 == 1, "stream_options": {"include_usage": True}}
            i += 1
            req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", json.dumps(body).encode())
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    text = r.read().decode()
            except urllib.error.HTTPError as exc:  # 404 until the task joined: not served yet
                assert exc.code == 404, exc.read()
                continue
            except OSError:
                continue  # the engine is going away
            if body["stream"]:
                usage = json.loads([ln for ln in text.splitlines() if ln.startswith("data: {")][-1][6:])["usage"]
            else:
                usage = json.loads(text)["usage"]
            self.served.append({"model": model, "tokens": usage["completion_tokens"]})

    def close(self):
        self.stop.set()
        self.thread.join(timeout=120)


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
             "--engine-image", "registry.invalid/muxtune/engine:test", "--log-level", "info",
             "--output-host-path", "/var/lib/muxtune/output"],  # kwok pods mount nothing; persistent in kind
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


# ------------------------------------------------------------------ assembling the stack, step by step
ALERTS = REPO / "charts" / "muxtune" / "files" / "alerts.yaml"
MIN_RUNNING_SCRAPES = 3
ENGINE_PORT = re.compile(r"serving /metrics and /v1/status on 127\.0\.0\.1:(\d+)")
SERVE_PORT = re.compile(r"serving the OpenAI API on http://127\.0\.0\.1:(\d+)")


def place_group(operator: OperatorSide | None, docs: list[dict], error: str | None):
    """(operator, (namespace, pod, group), error): where the operator packed the tasks, or, without
    an operator (or when it failed to pack them, then closed), the names a pod would have."""
    if operator is not None:
        try:
            return operator, operator.apply(docs), error
        except Exception as exc:  # noqa: BLE001 - fail the operator test, go on with the engine
            operator.close()
            return None, ("muxtune-system", "obs-group-0", "obs-group"), f"the operator did not pack the tasks: {exc}"
    return None, ("muxtune-system", "obs-group-0", "obs-group"), error


@dataclass
class HostEngine:
    """The group pod's command line, on this host, fed its task file through --watch."""

    proc: subprocess.Popen
    log: Path
    tasks_file: Path
    group: str
    group_key: bytes | None

    def write_tasks(self, docs: list[dict], revision: int) -> None:
        text = yaml.safe_dump_all(docs)
        if self.group_key is not None:  # signed as the operator signs the group's ConfigMap
            from muxtune.facts import trust

            trust.signature_path(self.tasks_file).write_text(trust.sign_tasks(self.group_key, self.group, revision, text))
        self.tasks_file.write_text(text)

    def alive_log(self) -> str:
        assert self.proc.poll() is None, "engine exited:\n" + tail(self.log)
        return self.log.read_text()


def start_engine(work: Path, docs: list[dict], operator: OperatorSide | None, placement: tuple[str, str, str],
                 procs: list) -> tuple[HostEngine, int]:
    """The engine with only the broken task; the others join (hot add via --watch) once Prometheus
    scrapes, so the scrapes see training in progress however fast this machine is. With an operator,
    the engine signs its reports and checks its task file, as in a pod. Returns it and its metrics port."""
    pod_ns, pod, group = placement
    engine_env = dict(os.environ)
    group_key = None
    if operator is not None:
        group_key = operator.group_key(pod_ns, group, work)
        (work / "group.key").write_bytes(group_key)
        engine_env.update({"MUXTUNE_GROUP": group, "MUXTUNE_GROUP_KEY_FILE": str(work / "group.key")})
    tasks_file, log = work / "tasks.yaml", work / "engine.log"
    exe = Path(sys.executable).with_name("muxtune")
    argv = [str(exe), "run", str(tasks_file), "--output", str(work / "output"), "--data-root", str(work), "--watch",
            "--no-progress", "--no-resume", "--metrics-port", "0", "--metrics-host", "127.0.0.1",
            "--token-budget", "160", "--device", "cpu", "--serve-port", "0"]
    engine = HostEngine(None, log, tasks_file, group, group_key)
    engine.write_tasks([d for d in docs if d["metadata"]["name"] == "broken"], 1)
    engine.proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=work, env=engine_env)
    procs.append(engine.proc)

    def engine_port():
        m = ENGINE_PORT.search(engine.alive_log())
        return int(m.group(1)) if m else None

    port = wait_for(engine_port, 120, "the engine's metrics server")
    if operator is not None:
        operator.point_at_engine(pod_ns, pod, f"http://127.0.0.1:{port}")
    return engine, port


def start_prometheus(prometheus_bin: str, work: Path, engine_port: int, engine_labels: dict, dcgm: DcgmStandIn,
                     operator: OperatorSide | None, procs: list) -> Prometheus:
    """Prometheus, scraping what a cluster's Prometheus would, with the chart's alert rules; once ready."""
    scrape = [
        {"job_name": "muxtune-engine", "honor_labels": True,
         "static_configs": [{"targets": [f"127.0.0.1:{engine_port}"], "labels": engine_labels}]},
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
    return prom


def wait_training_scraped(prom: Prometheus, engine: HostEngine, docs: list[dict]) -> None:
    """Training done, as Prometheus saw it (three Succeeded, one Failed), with every trained task
    caught Running by several scrapes: a machine so fast that they were not would make the panels
    on running tasks meaninglessly empty."""
    def finished():
        engine.alive_log()
        return (prom.value('count(muxtune_task_phase{phase="Succeeded"} == 1)') == 3
                and prom.value('count(muxtune_task_phase{phase="Failed"} == 1)') == 1)

    wait_for(finished, 600, "the engine's tasks to finish, as scraped", interval=1)
    for d in docs:
        name = d["metadata"]["name"]
        if name == "broken":
            continue
        # the phase gauge is 0 or 1 per scrape, so its sum counts the scrapes that saw Running
        seen = prom.value(f'sum_over_time(muxtune_task_phase{{task="{name}",phase="Running"}}[15m])')
        assert (seen or 0) >= MIN_RUNNING_SCRAPES, (
            f"{name} was scraped Running {seen or 0} times; raise STEPS so the run outlasts a few scrapes")


def operator_caught_up_error(operator: OperatorSide, prom: Prometheus) -> str | None:
    """None once the operator reports the tasks' final phases; else what went wrong (its test fails)."""
    def caught_up():
        assert operator.proc.poll() is None, "operator exited:\n" + tail(operator.log)
        return (prom.value('sum(muxtune_operator_tasks{phase="Succeeded"})') == 3
                and prom.value('sum(muxtune_operator_tasks{phase="Failed"})') == 1)

    try:
        wait_for(caught_up, 120, "the operator to report the tasks' final phases", interval=1)
    except (TimeoutError, AssertionError) as exc:
        return str(exc)
    return None
