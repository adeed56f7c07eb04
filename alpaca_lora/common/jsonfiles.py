"""Reading JSON and JSON Lines files with one-line errors that name the file and the line.

Every JSON file the package reads (data, seed tasks, journals) comes through here, so a UTF-8
byte-order mark (Windows editors write one) is accepted and nesting too deep for the parser is a
one-line error everywhere alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alpaca_lora.common.errors import DataError

_TOO_DEEP = "JSON nested too deeply to read (arrays or objects inside each other, hundreds of levels down)"


def read_text(path: str | Path, label: str | None = None) -> str:
    try:
        return decode(Path(path).read_bytes(), label or str(path))
    except OSError as exc:
        raise DataError(f"{label or path}: cannot read file: {exc}") from None


def decode(data: bytes, label: str) -> str:
    """UTF-8 text, without the byte-order mark some editors put first."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{label}: cannot read file: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def parse_json(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{label}: {_TOO_DEEP}") from None


def parse_json_lines(text: str, label: str, hint: str = "") -> list[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line; a line that is not JSON stops with one line."""
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{label}: line {number}: not valid JSON ({exc.msg}){hint}") from None
        except RecursionError:
            raise DataError(f"{label}: line {number}: {_TOO_DEEP}{hint}") from None
    return values

