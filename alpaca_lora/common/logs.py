"""Progress messages through Python's ``logging``: only rank 0 of a multi-process run speaks."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "[alpaca-lora] %(message)s"
EVERY_RANK = "alpaca_lora.every_rank"  # messages each rank must print (their own view of the run)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a notebook's stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name: str = "alpaca_lora") -> logging.Logger:
    """The package logger, set up once: INFO to stderr on rank 0, warnings only on the other ranks."""
    root = logging.getLogger("alpaca_lora")
    if not getattr(root, "_alpaca_lora_ready", False):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        root.propagate = False
        root._alpaca_lora_ready = True
    root.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    logging.getLogger(EVERY_RANK).setLevel(logging.INFO)
    if not name.startswith("alpaca_lora"):  # a module run as a script is "__main__": still one of ours
        name = f"alpaca_lora.{name}"
    return logging.getLogger(name)
