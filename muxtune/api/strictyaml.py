"""YAML read as kubectl reads it, and no looser: a duplicate key is an error (not "last one wins"),
and a hostile file (too large, nested too deep, an alias bomb) gets a clear error, not a traceback.

Values become what kubectl sends the API server (YAML -> JSON): a timestamp stays the string it
was written as, a whole float like 10.0 is the JSON number 10, and .inf/.nan are refused (JSON
has no such numbers), so strict pydantic validation sees what the CRD's schema sees.

Errors are `StrictYamlError`s whose text names the file, the line and the key.
"""
from __future__ import annotations

from pathlib import Path

import math

import yaml
from yaml.nodes import MappingNode, ScalarNode

MAX_FILE_BYTES = 8 << 20  # task files are ConfigMap-sized (1 MiB); far above any real one
MAX_DEPTH = 100  # a FineTuneTask nests 4 levels; the API server's own JSON limit is 10,000
MAX_NODES = 200_000  # after aliases are expanded: bounds the work of validating what was read


class StrictYamlError(ValueError):
    """A YAML file muxtune will not read; the message names the file and where."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and bounds nesting while composing."""

    # timestamps are strings on the way to the API server; keep them as written
    yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream, max_depth: int = MAX_DEPTH):
        super().__init__(stream)
        self._depth = 0
        self._max_depth = max_depth

    def compose_node(self, parent, index):  # PyYAML's composer recurses: bound it before Python does
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                mark = self.peek_event().start_mark
                raise yaml.MarkedYAMLError(None, None, f"nested deeper than {self._max_depth} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False):
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not key_node:
                raise yaml.MarkedYAMLError(
                    None, None,
                    f"duplicate key {key!r} (first defined on line {first.start_mark.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _where(path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"{path}:{mark.line + 1}: {problem}"
    return f"{path}: {problem}"


def _check_size(docs: list, path, limit: int) -> None:
    """Count nodes as a consumer will walk them (an alias counts each time it is used), stopping early."""
    budget = limit
    stack = list(docs)
    while stack:
        budget -= 1
        if budget < 0:
            raise StrictYamlError(f"{path}: more than {limit} values once aliases are expanded")
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _as_json(v, path):
    """The value kubectl would send: whole floats become ints; non-finite floats are refused."""
    if isinstance(v, dict):
        return {_as_json(k, path): _as_json(x, path) for k, x in v.items()}
    if isinstance(v, list):
        return [_as_json(x, path) for x in v]
    if isinstance(v, float):
        if not math.isfinite(v):
            raise StrictYamlError(f"{path}: {v} is not a JSON number (the API server cannot store it)")
        return int(v) if v.is_integer() else v
    return v


def read_text(path: Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The file's text, reading at most max_bytes + 1 bytes (so /dev/zero cannot fill memory)."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise StrictYamlError(f"{path}: larger than {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StrictYamlError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def load_all(text: str, path="<yaml>", *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> list:
    """Every document of a YAML stream, refusing duplicate keys and bounding depth and size."""
    loader = _Loader(text, max_depth)
    try:
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
    except yaml.YAMLError as exc:
        raise StrictYamlError(_where(path, exc)) from None
    except RecursionError:  # belt and braces: the depth bound above should come first
        raise StrictYamlError(f"{path}: nested too deeply") from None
    finally:
        loader.dispose()
    _check_size(docs, path, max_nodes)
    return [_as_json(d, path) for d in docs]


def load_file(path: Path, **kwargs) -> list:
    try:
        text = read_text(path)
    except OSError as exc:
        raise StrictYamlError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return load_all(text, path, **kwargs)
