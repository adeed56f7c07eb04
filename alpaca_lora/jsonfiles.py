"""Reading JSON and JSON Lines files with one-line errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alpaca_lora.errors import DataError


def read_text(path: str | Path, label: str | None = None) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{label or path}: cannot read file: {exc}") from None


def parse_json(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


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
    return values
