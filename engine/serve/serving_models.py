"""Adapters loaded and unloaded while the server runs, as vLLM does with
VLLM_ALLOW_RUNTIME_LORA_UPDATING: POST /v1/load_lora_adapter {"lora_name", "lora_path"} and
POST /v1/unload_lora_adapter {"lora_name"}, with vLLM's answers (200 and a plain-text "Success: ..."
line; 400 for a missing field, a name already served or an adapter that cannot be served; 404 for a
path or name that does not exist). The routes exist only with `muxtune serve --enable-lora-loading`
(without it: 404, as vLLM), and a path is loaded only from under a `--lora-root` (after resolving
symlinks and ..; elsewhere: 403), since the server reads whatever directory it is given.

The check of the directory (config, method, base model) runs on the HTTP thread; attaching the
weights runs on the engine thread between iterations (AdapterRegistry.call), as any change to the
multiplexed layers must; a directory that fails there is detached again, so a bad load loses nothing.
Despite the names, every method `muxtune serve` serves can be loaded (LoRA, IA3, prompt tuning).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import web

from muxtune.engine.serve.adapters import AdapterError, NameTaken, spec_from_peft_config
from muxtune.engine.serve.errors import HttpError
from muxtune.engine.serve.serving import read_json

ENGINE_WAIT_S = 120.0  # a load waits this long for the engine thread's next iteration


def inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def base_mismatch(cfg: dict, base_id: str, backbone_path: Path) -> str | None:
    """Why an adapter was trained on another base model, when its base_model_name_or_path names a
    local model (builtin:NAME or a directory) whose config.json is not the backbone's. Names that do
    not resolve here (a hub id, another machine's path) are left to the shape check, as vLLM does."""
    from muxtune.engine.model.loading import builtin_path

    named = cfg.get("base_model_name_or_path")
    if not named or named == base_id:
        return None
    local = builtin_path(named.removeprefix("builtin:")) if named.startswith("builtin:") else Path(named)
    if not (local / "config.json").is_file() or local.resolve() == Path(backbone_path).resolve():
        return None

    def arch(d: Path) -> dict:
        c = json.loads((d / "config.json").read_text())
        return {k: v for k, v in c.items() if not k.startswith("_") and k not in ("transformers_version", "dtype",
                                                                                    "torch_dtype")}

    if arch(local) == arch(Path(backbone_path)):
        return None
    return f"it was trained on base model {named!r}, not on the served {base_id!r}"


class AdapterLoading:
    """The two endpoints over one engine; `roots` are the directories adapters may be loaded from."""

    def __init__(self, engine, roots: list[Path]):
        if not roots:
            raise ValueError("--enable-lora-loading needs at least one --lora-root (where adapters may be loaded from)")
        self.engine, self.registry = engine, engine.registry
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def add_routes(self, router) -> None:
        router.add_post("/v1/load_lora_adapter", self.load)
        router.add_post("/v1/unload_lora_adapter", self.unload)

    def directory(self, lora_path: str) -> Path:
        """The adapter directory, confined to the roots: 403 outside them, 404 when it does not exist."""
        path = Path(lora_path).expanduser()
        resolved = path.resolve()
        if not inside(resolved, self.roots):
            raise HttpError(403, f"lora_path {lora_path!r} is outside the directories adapters may be loaded from "
                                 f"(--lora-root: {', '.join(map(str, self.roots))})", "permission_error",
                            param="lora_path", code="forbidden")
        if not resolved.is_dir():
            raise HttpError(404, f"No adapter found at {lora_path!r}", "NotFoundError", param="lora_path")
        return resolved

    async def load(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        name, lora_path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(lora_path, str) or not lora_path:
            raise HttpError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name == self.registry.base_id or any(m.name == name for m in self.registry.models()):
            raise HttpError(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput",
                            param="lora_name")
        directory = self.directory(lora_path)
        try:
            spec_from_peft_config(directory)
            why = base_mismatch(json.loads((directory / "adapter_config.json").read_text()), self.registry.base_id,
                                self.registry.backbone.path)
        except AdapterError as exc:
            raise HttpError(400, str(exc), "BadRequestError", param="lora_path") from None
        if why:
            raise HttpError(400, f"{lora_path}: cannot be served here: {why}", "BadRequestError", param="lora_path")
        try:
            await self._on_engine(lambda: self.registry.add_directory(name, directory))
        except NameTaken:
            raise HttpError(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput",
                            param="lora_name") from None
        except AdapterError as exc:
            raise HttpError(400, str(exc), "BadRequestError", param="lora_path") from None
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise HttpError(400, "'lora_name' must be provided.", "InvalidUserInput")
        try:
            await self._on_engine(lambda: self.registry.remove(name))
        except KeyError:
            raise HttpError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError",
                            param="lora_name") from None
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _on_engine(self, fn):
        fut = self.registry.call(fn)
        self.engine.wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), ENGINE_WAIT_S)
        except asyncio.TimeoutError:
            fut.cancel()
            raise HttpError(503, f"the engine did not take the change within {ENGINE_WAIT_S:g}s", "server_error",
                            retry_after=5) from None
