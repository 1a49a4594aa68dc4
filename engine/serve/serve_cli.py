"""`muxtune serve DIRS...`: finished adapters over one backbone, until SIGTERM/SIGINT.

The command's own checks (adapter directories, one base model, a free port) come first, each an
`error:` line and exit code 2, before the backbone loads."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

from muxtune import logs
from muxtune.engine import preflight
from muxtune.engine.serve.adapters import AdapterError, spec_from_peft_config
from muxtune.runconfig import ServeConfig


def base_model_id(path: Path) -> str:
    """builtin:NAME for a built-in model's cache directory, else the path as given."""
    from muxtune.engine.model.loading import BUILTIN_CONFIGS
    from muxtune.storage.cache import cache_home

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


def served_names(dirs: list[Path]) -> tuple[dict[str, Path], set]:
    """{served name: adapter directory} and the base models the adapters name; CliProblem for an
    adapter that cannot be served or two that would share a name."""
    names, bases = {}, set()
    for d in dirs:
        try:
            spec_from_peft_config(d)
            bases.add(json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path"))
        except AdapterError as exc:
            raise preflight.CliProblem(str(exc)) from None
        name = d.resolve().name
        if name in names:
            raise preflight.CliProblem(f"{d} and {names[name]} would both be served as {name!r}")
        names[name] = d
    return names, bases


def backbone_of(base_model: str | None, bases: set) -> tuple[Path, str]:
    """The backbone's directory and the id it is served under: --base-model, else the one base
    model every adapter names."""
    from muxtune.engine.model.loading import resolve_base_model

    try:
        if base_model:
            return resolve_base_model(base_model, Path.cwd()), base_model
        if len(bases) != 1 or None in bases:
            raise preflight.CliProblem("the adapters name different (or no) base models: "
                                       + ", ".join(map(str, sorted(bases, key=str))) + "; pass --base-model")
        path = resolve_base_model(next(iter(bases)), Path.cwd())
        return path, base_model_id(path)
    except (ValueError, FileNotFoundError) as exc:
        raise preflight.CliProblem(str(exc)) from None


def serve_from_cli(cfg: ServeConfig) -> int:
    """Module-level: under --dp/--tp/--pp it is also the entrypoint of the ranks it starts (run.py's way)."""
    from muxtune.engine.parallel import ranks

    logs.configure(cfg.log_level)
    launching = ranks.must_launch(cfg.dp, cfg.tp, cfg.pp)
    try:
        if cfg.lora_root and not cfg.enable_lora_loading:
            raise preflight.CliProblem("--lora-root is for --enable-lora-loading")
        if cfg.enable_lora_loading and not cfg.lora_root:
            raise preflight.CliProblem("--enable-lora-loading needs at least one --lora-root (where adapters may be loaded from)")
        if cfg.enable_lora_loading and cfg.serve_tokens:  # the load endpoints answer for no one namespace
            raise preflight.CliProblem("--enable-lora-loading is not per-tenant: it cannot be combined with --serve-tokens")
        if cfg.enable_lora_loading and cfg.dp * cfg.tp * cfg.pp > 1:  # a load would reach rank 0's layers only
            raise preflight.CliProblem("--enable-lora-loading serves from one process (--dp, --tp and --pp 1)")
        if not cfg.adapters and not (cfg.enable_lora_loading and cfg.base_model):
            raise preflight.CliProblem("no adapters to serve: name adapter directories, or pass --base-model with --enable-lora-loading")
        names, bases = served_names(adapter_dirs([Path(d) for d in cfg.adapters]))
        path, base_id = backbone_of(cfg.base_model, bases)
        sock = None
        if launching or os.environ.get("RANK", "0") == "0":  # rank 0 alone fronts the API
            sock = preflight.listen("--port", cfg.host, cfg.port)  # before the backbone loads: a busy port is one line, at once
    except preflight.CliProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if launching:  # the port was free; rank 0 binds it again
        sock.close()
        code = ranks.launch(cfg.world, serve_from_cli, cfg)
        return 0 if code in (128 + signal.SIGTERM, 128 + signal.SIGINT) else code  # stopped as asked
    from muxtune.engine.runtime import pick_device

    group, device = ranks.join(cfg.dp, cfg.tp, cfg.pp, pick_device(cfg.device))
    try:
        return _serve(cfg, names, path, base_id, sock, group, device)
    finally:
        group.close()


def _serve(cfg: ServeConfig, names: dict[str, Path], path: Path, base_id: str, sock, group, device) -> int:
    from muxtune.engine.observe.engine_metrics import EngineMetrics
    from muxtune.engine.runtime import StopFlag, install_kernels, load_multiplexed, pick_dtype
    from muxtune.engine.serve.stack import Serving

    backbone = load_multiplexed(path, device, pick_dtype(cfg.dtype, device), group if group.world > 1 else None,
                                announce=lambda msg: print(msg, file=sys.stderr), trust_remote_code=cfg.trust_remote_code,
                                quantization=cfg.quantize)
    install_kernels(backbone, device)
    stop = StopFlag(escalate=group.world == 1)

    def lead(channel=None):
        engine_metrics = EngineMetrics()  # /metrics on the API port: the serving series plus memory in use and peak
        engine_metrics.attach(SimpleNamespace(backbone=backbone, tasks={}))
        serving = Serving(backbone, base_id, cfg, sock=sock, registry=engine_metrics.registry, channel=channel,
                          lora_roots=cfg.lora_root if cfg.enable_lora_loading else None)
        for name, d in names.items():
            serving.adapters.add_directory(name, d)
        return serving.start()

    from muxtune.engine.serve.distributed import GroupBroken, serve_in_group
    from muxtune.engine.serve.follower import Follower
    from muxtune.engine.serve.stack import limits_from

    try:
        if group.world == 1:
            serving = lead()
        else:  # rank 0 fronts the API, every rank follows it (engine/serve/distributed.py)
            serving = serve_in_group(group, lead, lambda ch: Follower(backbone, group, limits_from(cfg), ch))
    except (AdapterError, OSError, ValueError, GroupBroken) as exc:
        if group.is_writer:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        serving.loop.run(stop)
    except GroupBroken as exc:  # a rank failed: the first recorded reason, once
        if group.is_writer:
            print(f"error: {exc}", file=sys.stderr)
        raise  # every rank's process ends (as run's ranks do): collectives with it fail at once, the launcher reports
    finally:
        serving.close()
    from muxtune.engine.parallel.ranks import exit_if_signalled

    return exit_if_signalled(group, 0, stop.signum is not None)
