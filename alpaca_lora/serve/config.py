"""The server's settings (``alpaca-lora serve key=value ...``): the model as it was trained, the engine, and the
server's own keys, checked before the model loads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.common.settings import check, key
from alpaca_lora.inference.engine import EngineSettings
from alpaca_lora.inference.loading import InferenceModel, load_inference_settings

TOOL = "serve"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class ServeConfig(EngineSettings, InferenceModel):
    host: str = key("127.0.0.1", "interface to bind (0.0.0.0 exposes the server to the network); on loopback, "
                                 "only requests addressed to a loopback name are answered")
    port: int = key(8000, "port")
    api_key_env: Optional[str] = key(None, "name of an environment variable holding the key clients must send")
    served_model_name: Optional[str] = key(None, "the model id clients ask for (default: the adapter's or model's "
                                                 "name)")
    default_max_tokens: int = key(512, "completion tokens when a request does not say (less if the context is shorter)")
    max_request_bytes: int = key(1_000_000, "largest request body accepted (413 past it)")


def load_serve_config(argv: list[str]) -> ServeConfig:
    cfg = load_inference_settings(ServeConfig, argv, TOOL)
    check(cfg.engine_checks() + [(cfg.max_request_bytes >= 1024, "max_request_bytes", "must be at least 1024")])
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"key 'api_key_env': the environment variable {cfg.api_key_env} is not set")
    return cfg
