"""Basic auth for the Gradio pages (``app``, ``arena``): the credentials come from an environment variable the user
names (``auth_env=NAME``, holding ``user:password``), never from the command line, a config file or a log."""

from __future__ import annotations

import os

from alpaca_lora.common.errors import ConfigError


def basic_auth(auth_env: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from the variable ``auth_env`` names, None without ``auth_env``; one line when the
    variable is unset or not ``user:password`` (the password may itself contain colons)."""
    if not auth_env:
        return None
    user, _, password = os.environ.get(auth_env, "").partition(":")
    if not user or not password:
        raise ConfigError(f"key 'auth_env': {auth_env} must hold user:password")
    return user, password
