"""Wiring: the serving stack for `muxtune run --serve-port` (co-serving) and `muxtune serve` (serve_cli.py);
in a parallel group, rank 0's stack (the other ranks follow: distributed.py, follower.py)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Literal

from muxtune.engine.serve.adapters import AdapterError, AdapterRegistry, spec_from_peft_config
from muxtune.engine.serve.controller import Slo, SloController
from muxtune.engine.serve.coserve import CoServer
from muxtune.engine.serve.engine import ServeEngine, ServeLimits
from muxtune.engine.serve.http_api import OpenAIApi
from muxtune.engine.serve.listener import ConnectionGuard, HttpThread, listen
from muxtune.engine.serve.serving_metrics import ServeMetrics
from muxtune.engine.serve.serving_models import AdapterLoading
from muxtune.engine.serve.tenant_auth import TenantTokens, tenant_middleware
from muxtune.runconfig import DEFAULT_TOKEN_BUDGET, RunConfig, ServeFlags

log = logging.getLogger("muxtune.serve")


def limits_from(flags: ServeFlags) -> ServeLimits:
    return ServeLimits(max_num_seqs=flags.max_num_seqs, max_model_len=flags.max_model_len, max_queue=flags.max_queue,
                       max_tokens=flags.max_tokens, max_prefill_tokens=flags.max_prefill_tokens,
                       max_queue_wait_s=flags.max_queue_wait_s)


class Serving:
    """Engine, controller, hybrid loop and HTTP server of one backbone, started and stopped together.
    `sock` is the serving port bound beforehand (preflight); else host:port binds here (OSError if busy).
    only_enabled serves only tasks with spec.serving.enabled; policy is the SLO controller's;
    lora_roots (not None) enables loading adapters over HTTP from under those directories."""

    def __init__(self, backbone, base_id: str, flags: ServeFlags, *, host: str = "127.0.0.1", port: int = 0,
                 sock=None, trainer=None, registry=None, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 only_enabled: bool = False, policy: Literal["coserve", "temporal"] = "coserve", channel=None,
                 lora_roots: list[Path] | None = None):
        sock = sock if sock is not None else listen(host, port)
        try:
            self._build(backbone, base_id, flags, sock, trainer, registry, token_budget, only_enabled, policy, channel,
                        lora_roots)
        except BaseException:
            sock.close()
            raise

    def _build(self, backbone, base_id, flags: ServeFlags, sock, trainer, registry, token_budget,
               only_enabled, policy, channel, lora_roots) -> None:
        from transformers import AutoTokenizer

        slo = Slo(tpot_s=flags.slo_tpot_ms / 1000, ttft_s=flags.slo_ttft_ms / 1000)
        self.metrics = ServeMetrics(registry, slo=slo)
        self.adapters = AdapterRegistry(backbone, base_id, trainer, only_enabled=only_enabled)
        self.engine = ServeEngine(backbone, self.adapters, limits_from(flags), self.metrics)
        self.controller = SloController(slo, token_budget, policy=policy)
        if channel is None:
            self.loop = CoServer(self.engine, self.controller, trainer, self.metrics, train_floor=flags.train_floor)
        else:  # rank 0 of a group: every decision also goes to the other ranks (distributed.py)
            from muxtune.engine.serve.distributed import LeaderLoop

            self.loop = LeaderLoop(self.engine, self.controller, trainer, self.metrics, train_floor=flags.train_floor,
                                   channel=channel, group=channel.group)
        self.metrics.attach(self.engine, self.controller, trainer, self.loop)
        template = Path(flags.chat_template).read_text() if flags.chat_template else None
        tokenizer = AutoTokenizer.from_pretrained(backbone.path, trust_remote_code=backbone.trust_remote_code)  # the HTTP thread's own copy
        loading = AdapterLoading(self.engine, lora_roots) if lora_roots is not None else None
        self.api = OpenAIApi(self.engine, tokenizer, template, self.metrics, loading)
        guard = ConnectionGuard(flags.max_connections)
        middlewares = [guard.middleware]
        if flags.serve_tokens:  # a cluster pod: per-namespace tokens (engine/serve/tenant_auth.py)
            middlewares.append(tenant_middleware(TenantTokens(flags.serve_tokens), base_id))
        self.http = HttpThread(self.api.app(*middlewares), sock, guard, idle_timeout=flags.idle_timeout_s)

    @classmethod
    def coserving(cls, backbone, base_id: str, trainer, cfg: RunConfig, sock, engine_metrics=None,
                  channel=None) -> Serving:
        """`muxtune run --serve-port`: serve the trainer's tasks (started), metrics on the engine's registry;
        channel: rank 0 of a group (engine/serve/distributed.py)."""
        serving = cls(backbone, base_id, cfg, sock=sock, trainer=trainer, token_budget=cfg.token_budget,
                      registry=engine_metrics.registry if engine_metrics is not None else None,
                      only_enabled=cfg.serve_tasks == "enabled", policy=cfg.serve_policy, channel=channel)
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

