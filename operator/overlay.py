"""The operator's own recent writes, laid over the watch's view until the watch shows them.

A pass that runs before the watch caught up with the previous pass's writes would otherwise repeat
or contradict them. An entry goes once the watch shows the object at (at least) our
resourceVersion, once it is older than ``OVERLAY_TTL``, or once the watch sees the object deleted.
"""
from __future__ import annotations

import time
from typing import Mapping

OVERLAY_TTL = 120.0


def _rv(obj: Mapping | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or -1)
    except ValueError:
        return -1


def _key(obj: Mapping) -> tuple[str, str]:
    m = obj["metadata"]
    return (m.get("namespace") or "", m["name"])


class Overlay:
    def __init__(self) -> None:
        # (plural, namespace, name) -> (resourceVersion, object or None for our delete, when noted)
        self.entries: dict[tuple[str, str, str], tuple[int, dict | None, float]] = {}

    def note(self, plural: str, obj: dict | None, key: tuple[str, str] | None = None) -> None:
        """Remember our own write (None: deleted) until the watch shows it."""
        if obj is not None and obj.get("kind") == "Status":
            obj = None
        k = key or _key(obj)  # type: ignore[arg-type]
        self.entries[(plural, k[0], k[1])] = (_rv(obj) if obj else -1, obj, time.monotonic())

    def forget(self, plural: str, namespace: str | None, name: str) -> None:
        """The watch saw the object deleted: our remembered write of it is void."""
        self.entries.pop((plural, namespace or "", name), None)

    def names(self, plural: str) -> set[str]:
        return {name for (pl, _, name) in self.entries if pl == plural}

    def lay_over(self, plural: str, objs: dict[tuple[str, str], dict]) -> dict[tuple[str, str], dict]:
        """``objs`` (the watch's view, changed in place) with our newer writes; stale entries go."""
        now = time.monotonic()
        for (pl, ns, name), (rv, obj, t) in list(self.entries.items()):
            if pl != plural:
                continue
            cur = objs.get((ns, name))
            if now - t > OVERLAY_TTL:
                del self.entries[(pl, ns, name)]
                continue
            if cur is None and plural == "finetunetasks":
                del self.entries[(pl, ns, name)]  # we only patch tasks: gone from the index means deleted
                continue
            if obj is None:  # our delete
                if cur is None:
                    del self.entries[(pl, ns, name)]
                else:
                    objs.pop((ns, name))
                continue
            if cur is not None and _rv(cur) >= rv:
                del self.entries[(pl, ns, name)]
                continue
            objs[(ns, name)] = obj
        return objs
