"""Typed command-line settings shared by every entry point.

``key=value`` overrides (and YAML layers such as recipes) are merged by OmegaConf into a dataclass.
Text keys (a ``str`` field: instructions, inputs, prompts, paths, templates) take the value exactly
as the shell passed it, byte for byte; every other key is read as a YAML value (``max_steps=5``,
``lora.target_modules=[q_proj,v_proj]``, ``stop=[]``). Validation reports every problem it finds,
each on its own line naming its key.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar, Union

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alpaca_lora.common.errors import ConfigError, exit_on_user_error

T = TypeVar("T")
COMMAND = "alpaca-lora"


def key(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with its ``--help`` text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class Layer:
    """One source of settings: values for OmegaConf to merge and type-check, and text values that
    must reach the dataclass untouched (OmegaConf would parse and interpolate them)."""

    source: str
    values: Any
    texts: dict[tuple[str, ...], str] = field(default_factory=dict)


def command_line(overrides: list[str], schema: type) -> Layer:
    """The ``key=value`` arguments as a layer: text keys verbatim, the others as YAML values."""
    values: dict = {}
    texts: dict[tuple[str, ...], str] = {}
    for item in overrides:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise ConfigError(f"argument '{item}' is not key=value (see --help)")
        path = tuple(name.split("."))
        if _field_type(schema, path) is str:
            texts[path] = value
            parsed: Any = "text"  # a placeholder for OmegaConf; the text itself is set after the merge
        else:
            try:
                parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={value}"]))["value"]
            except Exception as exc:  # a value that is not valid YAML, e.g. an unclosed list
                raise ConfigError(f"command line: key '{name}': cannot parse {value!r}: "
                                  f"{str(exc).splitlines()[0]}") from None
        node = values
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = parsed
    return Layer("command line", OmegaConf.create(values), texts)


def peek(overrides: list[str], name: str) -> str | None:
    """The last value given for one key, as text (to choose the layers before building)."""
    found = None
    for item in overrides:
        key_, equals, value = item.partition("=")
        if equals and key_ == name:
            found = value
    return found


def build(schema: type[T], layers: list[Layer], tool: str) -> T:
    """Defaults of ``schema`` <- each layer in turn, as a ``schema`` instance."""
    merged = OmegaConf.structured(schema)
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer.values)
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, layer.source, tool)) from None
    try:
        result = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, "configuration", tool)) from None
    for layer in layers:
        for path, text in layer.texts.items():
            target = result
            for part in path[:-1]:
                target = target[part] if isinstance(target, dict) else getattr(target, part)
            if isinstance(target, dict):
                target[path[-1]] = text
            else:
                setattr(target, path[-1], text)
    return result


def _field_type(schema: type, path: tuple[str, ...]) -> Any:
    """The declared type at a dotted key (``Optional`` unwrapped), or None for an unknown key."""
    current: Any = schema
    for depth, part in enumerate(path):
        if not dataclasses.is_dataclass(current):
            origin = typing.get_origin(current)
            if origin in (dict, typing.Dict) and depth == len(path) - 1:
                return _unwrap(typing.get_args(current)[1])
            return None
        hints = typing.get_type_hints(current)
        if part not in hints:
            return None
        current = _unwrap(hints[part])
    return current


def _unwrap(hint: Any) -> Any:
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _describe(exc: OmegaConfBaseException, source: str, tool: str) -> str:
    name = getattr(exc, "full_key", None) or "?"
    message = str(exc).splitlines()[0]
    if "not in" in message or type(exc).__name__ == "ConfigKeyError":
        return f"{source}: unknown key '{name}' ({COMMAND} {tool} --help lists the keys)"
    if "missing mandatory value" in message.lower():
        return f"{source}: key '{name}' must be set"
    return f"{source}: key '{name}': {message}"


def check(checks: Iterable[tuple[Any, str, str]]) -> None:
    """Raises one :class:`ConfigError` listing every failed ``(ok, key, message)``, a line each.

    ``ok`` may be a callable, evaluated lazily; one that raises (because an earlier check failed,
    say a division by a zero it forbids) is skipped: the earlier line already names the problem.
    """
    problems = []
    for ok, name, message in checks:
        if callable(ok):
            try:
                ok = ok()
            except Exception:
                continue
        if not ok:
            problems.append(f"key '{name}'{'' if message.startswith(':') else ' '}{message}")
    if problems:
        raise ConfigError("\n".join(problems))


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


def help_text(tool: str, arguments: str, schema: type, notes: str = "") -> str:
    lines = [f"usage: {COMMAND} {tool} {arguments}".rstrip()]
    if notes:
        lines.append(notes)
    lines.append("keys (text keys are taken as typed; others are YAML values):")
    return "\n".join(lines + key_lines(schema))


def wants_help(argv: list[str]) -> bool:
    return bool({"-h", "--help"} & set(argv))


def entry_point(argv: list[str] | None, help: Callable[[], str], load: Callable[[list[str]], T],
                run: Callable[[T], Any]) -> Any:
    """What every command does: ``--help`` (before anything is parsed), settings loaded and
    validated, the work; a user error at any point ends in ``error:`` lines and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print(help())
        return None
    with exit_on_user_error():
        return run(load(argv))


@dataclass
class Subcommand:
    """One subcommand of a stage (``evaluate answer``, ``arena report``): its keys, its loader, what ``--help``
    shows as its arguments, and the work."""

    schema: type
    load: Callable[[list[str]], Any]
    arguments: str
    run: Callable[[Any], Any]


def dispatch(argv: list[str] | None, stage: str, subcommands: dict[str, Subcommand]) -> int:
    """``STAGE NAME [key=value ...]`` to its subcommand through :func:`entry_point`; a name may be two words
    (``arena report``) and ``""`` is the stage run without one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    named = [n for n in sorted(subcommands, key=lambda n: -len(n.split())) if n and argv[:len(n.split())] == n.split()]
    bare = "" in subcommands and (not argv or "=" in argv[0] or wants_help(argv[:1]))
    name = named[0] if named else "" if bare else None
    usage = "usage:\n" + "\n".join(f"  {COMMAND} {' '.join(filter(None, [stage, n]))} {s.arguments}"
                                    for n, s in subcommands.items())
    if name is None:
        if argv and not wants_help(argv[:1]):
            print(f"error: unknown command '{argv[0]}'\n\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0 if argv else 2
    sub = subcommands[name]
    tool = " ".join(filter(None, [stage, name]))
    return entry_point(argv[len(name.split()):], lambda: help_text(tool, sub.arguments, sub.schema), sub.load,
                       sub.run) or 0

