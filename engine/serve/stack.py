"""Wiring: the serving stack for `muxtune run --serve-port` (co-serving) and `muxtune serve`."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

from muxtune.engine.serve.adapters import AdapterError, AdapterRegistry, spec_from_peft_config
from muxtune.engine.serve.controller import Slo, SloController
from muxtune.engine.serve.coserve import CoServer
from muxtune.engine.serve.engine import ServeEngine, ServeLimits
from muxtune.engine.serve.http_api import OpenAIApi
from muxtune.engine.serve.listener import ConnectionGuard, HttpThread, listen
from muxtune.engine.serve.serving_metrics import ServeMetrics

log = logging.getLogger("muxtune.serve")


def limits_from(cmd) -> ServeLimits:
    return ServeLimits(max_num_seqs=cmd.max_num_seqs, max_model_len=cmd.max_model_len, max_queue=cmd.max_queue,
                       max_tokens=cmd.max_tokens, max_prefill_tokens=cmd.max_prefill_tokens,
                       max_queue_wait_s=cmd.max_queue_wait_s)


class Serving:
    """Engine, controller, hybrid loop and HTTP server of one backbone, started and stopped together.
    `sock` is the serving port bound beforehand (preflight); else host:port binds here (OSError if busy)."""

    def __init__(self, backbone, base_id: str, cmd, *, host: str = "127.0.0.1", port: int = 0, sock=None,
                 trainer=None, registry=None, token_budget: int = 4096):
        sock = sock if sock is not None else listen(host, port)
        try:
            self._build(backbone, base_id, cmd, sock, trainer, registry, token_budget)
        except BaseException:
            sock.close()
            raise

    def _build(self, backbone, base_id, cmd, sock, trainer, registry, token_budget) -> None:
        from transformers import AutoTokenizer

        slo = Slo(tpot_s=cmd.slo_tpot_ms / 1000, ttft_s=cmd.slo_ttft_ms / 1000)
        self.metrics = ServeMetrics(registry, slo=slo)
        self.adapters = AdapterRegistry(backbone, base_id, trainer,
                                        only_enabled=getattr(cmd, "serve_tasks", "all") == "enabled")
        self.engine = ServeEngine(backbone, self.adapters, limits_from(cmd), self.metrics)
        self.controller = SloController(slo, token_budget, policy=getattr(cmd, "serve_policy", "coserve"))
        self.loop = CoServer(self.engine, self.controller, trainer, self.metrics, train_floor=cmd.train_floor)
        self.metrics.attach(self.engine, self.controller, trainer, self.loop)
        template = Path(cmd.chat_template).read_text() if cmd.chat_template else None
        tokenizer = AutoTokenizer.from_pretrained(backbone.path)  # the HTTP thread's own copy
        self.api = OpenAIApi(self.engine, tokenizer, template, self.metrics)
        guard = ConnectionGuard(cmd.max_connections)
        self.http = HttpThread(self.api.app(guard.middleware), sock, guard, idle_timeout=cmd.idle_timeout_s)

    @classmethod
    def coserving(cls, backbone, base_id: str, trainer, cmd, sock, engine_metrics=None) -> Serving:
        """`muxtune run --serve-port`: serve the trainer's tasks (started), metrics on the engine's registry."""
        serving = cls(backbone, base_id, cmd, sock=sock, trainer=trainer, token_budget=cmd.token_budget,
                      registry=engine_metrics.registry if engine_metrics is not None else None)
        serving.adapters.sync_tasks()
        if engine_metrics is not None:  # /v1/status tells the operator which tasks answer requests
            engine_metrics.status_extras.append(serving.adapters.served_tasks)
        return serving.start()

    def start(self) -> Serving:
        self.http.start()
        print(f"serving the OpenAI API on http://{self.http.host}:{self.http.port}/v1 "
              f"(models: {', '.join([self.adapters.base_id] + [m.name for m in self.adapters.models()])})",
              file=sys.stderr, flush=True)
        return self

    def close(self, reason: str = "shutting down") -> None:
        self.engine.close(reason)
        self.http.stop()


def base_model_id(path: Path) -> str:
    """builtin:NAME for a built-in model's cache directory, else the path as given."""
    from muxtune.engine.model.loading import BUILTIN_CONFIGS, cache_home

    p = Path(path)
    if p.parent.resolve() == (cache_home() / "models").resolve():
        for name in BUILTIN_CONFIGS:
            if p.name.startswith(name + "-") and len(p.name) == len(name) + 9:
                return f"builtin:{name}"
    return str(path)


def adapter_dirs(paths: list[Path]) -> list[Path]:
    """Adapter directories as given, and the adapter directories inside any other directory given:
    a namespace folder (`runs/quickstart/*`) or a run's output (`runs/quickstart`, whose tasks lie
    in <namespace>/<name>); hidden entries (the run lock, moved-aside outputs) are skipped."""
    def found(d: Path, depth: int) -> list[Path]:
        if (d / "adapter_config.json").exists():
            return [d]
        if depth == 0 or not d.is_dir():
            return []
        return [a for c in sorted(d.iterdir()) if not c.name.startswith(".") for a in found(c, depth - 1)]

    out = []
    for p in paths:
        out += found(p, 2) or [p]  # nothing found: the path as given, for a clear error
    return out


def serve_from_cli(cmd) -> int:
    """`muxtune serve DIRS...`: finished adapters over one backbone, until SIGTERM/SIGINT."""
    import json

    from muxtune import logs
    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import load_backbone, resolve_base_model
    from muxtune.engine.run import StopFlag, pick_device, pick_dtype

    logs.configure(cmd.log_level)
    dirs = adapter_dirs([Path(d) for d in cmd.adapters])
    names, bases = {}, set()
    for d in dirs:
        try:
            spec_from_peft_config(d)
            bases.add(json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path"))
        except AdapterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        name = d.resolve().name
        if name in names:
            print(f"error: {d} and {names[name]} would both be served as {name!r}", file=sys.stderr)
            return 2
        names[name] = d
    try:
        if cmd.base_model:
            path, base_id = resolve_base_model(cmd.base_model, Path.cwd()), cmd.base_model
        else:
            if len(bases) != 1 or None in bases:
                print("error: the adapters name different (or no) base models: " + ", ".join(map(str, sorted(bases, key=str)))
                      + "; pass --base-model", file=sys.stderr)
                return 2
            path = resolve_base_model(bases.pop(), Path.cwd())
            base_id = base_model_id(path)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from muxtune.engine import preflight

    try:  # bind before the backbone loads: a busy port is one line, at once
        sock = preflight.listen("--port", cmd.host, cmd.port)
    except preflight.CliProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = pick_device(cmd.device)
    backbone = MultiplexedBackbone(load_backbone(path, device, pick_dtype(cmd.dtype, device)))
    from muxtune.engine.peft import lora_kernel
    lora_kernel.install(backbone.ctx, device)
    from muxtune.engine.observe.engine_metrics import EngineMetrics

    stop = StopFlag()
    engine_metrics = EngineMetrics()  # /metrics on the API port: the serving series plus memory in use and peak
    engine_metrics.attach(SimpleNamespace(backbone=backbone, tasks={}))
    try:
        serving = Serving(backbone, base_id, cmd, sock=sock, registry=engine_metrics.registry)
        for name, d in names.items():
            serving.adapters.add_directory(name, d)
        serving.start()
    except (AdapterError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        serving.loop.run(stop)
    finally:
        serving.close()
    return 0
