"""The app, ``alpaca-lora app`` (``python -m alpaca_lora.app``): a Gradio page to try a model (``page``), and what it
does with a visit's terms and votes (``voting``; the votes database is ``alpaca_lora.feedback.store``).

``from alpaca_lora.app import build_page, launch_kwargs`` (notebooks, scripts) keeps working: those names are the
page module's, imported when first used."""

from __future__ import annotations

import importlib

_PAGE_NAMES = ("AppConfig", "EXAMPLES", "build_page", "launch_kwargs", "load_app_config", "respond", "run")


def __getattr__(name: str):
    if name in _PAGE_NAMES:
        return getattr(importlib.import_module("alpaca_lora.app.page"), name)
    if name == "main":
        return importlib.import_module("alpaca_lora.app.__main__").main
    raise AttributeError(f"module 'alpaca_lora.app' has no attribute {name!r}")
