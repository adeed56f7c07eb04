"""Typed command-line settings shared by every entry point: ``key=value`` overrides (and YAML
layers) merged by OmegaConf into a dataclass, with one-line errors that name the key."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alpaca_lora.errors import UserError


class ConfigError(UserError):
    pass


def key(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with its ``--help`` text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"argument '{item}' is not key=value (see --help)")
    try:
        return OmegaConf.from_dotlist(overrides)
    except Exception as exc:  # a value that is not valid YAML, e.g. an unclosed list
        raise ConfigError(f"command line: cannot parse {overrides}: {str(exc).splitlines()[0]}") from None


def build(schema: type, layers: list[tuple[str, Any]], tool: str) -> Any:
    """Defaults of ``schema`` <- each (source name, config) layer in turn, as a ``schema`` instance."""
    merged = OmegaConf.structured(schema)
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, source, tool)) from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, "configuration", tool)) from None


def _describe(exc: OmegaConfBaseException, source: str, tool: str) -> str:
    name = getattr(exc, "full_key", None) or "?"
    message = str(exc).splitlines()[0]
    if "not in" in message or type(exc).__name__ == "ConfigKeyError":
        return f"{source}: unknown key '{name}' (python -m {tool} --help lists the keys)"
    if "missing mandatory value" in message.lower():
        return f"{source}: key '{name}' must be set"
    return f"{source}: key '{name}': {message}"


def key_lines(schema: type, prefix: str = "") -> list[str]:
    """One ``--help`` line per key (nested dataclasses as dotted keys) with its default."""
    lines = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.default_factory):
            lines += key_lines(f.default_factory, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = "required" if default == MISSING else repr(default)
        lines.append(f"  {prefix + f.name:<26} {f.metadata['help']} [{shown}]")
    return lines


def wants_help(argv: list[str], tool: str, arguments: str, schema: type) -> bool:
    """Prints the usage line and every key when ``-h`` or ``--help`` is among ``argv``."""
    if not {"-h", "--help"} & set(argv):
        return False
    print(f"usage: python -m {tool} {arguments}\nkeys:")
    print("\n".join(key_lines(schema)))
    return True
