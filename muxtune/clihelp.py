"""Readable `--help` for the pydantic-settings commands: metavars a user can read (PATH, N), not
Python types (list[Path], int), and no "default factory: list" for an empty default."""
from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

from pydantic_settings import CliSettingsSource

METAVARS: dict[Any, str] = {Path: "PATH", int: "N", float: "NUM", str: "TEXT"}
_EMPTY_FACTORY = re.compile(r"\(default factory: (list|dict|set|tuple)\)")


class ReadableCliSource(CliSettingsSource):
    def _metavar_format_recurse(self, obj: Any) -> str:
        if obj in METAVARS:
            return METAVARS[obj]
        origin, args = typing.get_origin(obj), typing.get_args(obj)
        if origin in (list, set, tuple) and args:
            return self._metavar_format_recurse(args[0])  # repeat the flag for more
        if args and type(None) in args and len(args) == 2:  # X | None
            return self._metavar_format_recurse(next(a for a in args if a is not type(None)))
        return super()._metavar_format_recurse(obj)

    def _help_format(self, *args, **kwargs) -> str:
        return _EMPTY_FACTORY.sub("(default: none)", super()._help_format(*args, **kwargs))


def run_cli(model_cls, argv: list[str]) -> Any:
    """CliApp.run with the readable help."""
    from pydantic_settings import CliApp

    return CliApp.run(model_cls, cli_args=argv, cli_settings_source=ReadableCliSource(model_cls))
