"""Structured (one JSON object per line) and quiet-by-default logging to stderr, for every muxtune process."""
from __future__ import annotations

import json
import logging
import sys
import time

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "warning", extra: dict[str, str] | None = None) -> None:
    """JSON lines on stderr for muxtune's loggers at `level`, and for `extra` loggers
    (name -> level) such as kopf's, so one process writes one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name, lvl in {"muxtune": level, **(extra or {})}.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(lvl.upper())
        logger.propagate = False
    # bitsandbytes' CPU backend warns on import (PEFT imports it whenever it is installed) that an
    # optional kernel it would fetch from the Hub is absent: every run printed it mid-progress bar
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:  # transformers' own bars and notices are noise in a training log
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
