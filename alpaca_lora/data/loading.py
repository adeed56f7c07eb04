"""Loading and validating Alpaca-format records, before any model is loaded.

A source is a local ``.json`` (a list of records) or ``.jsonl`` file, an http(s) URL (downloaded
once into the cache), ``builtin:NAME`` (a set this package generates), or a Hugging Face dataset
id such as ``tatsu-lab/alpaca``. Every record comes out as ``{instruction, input, output}``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from alpaca_lora.errors import DataError
from alpaca_lora.jsonfiles import parse_json, parse_json_lines, read_text
from alpaca_lora.paths import cache_dir

FIELDS = ("instruction", "input", "output")


@dataclass
class LoadedData:
    records: list[dict[str, str]]
    source: str
    duplicates_dropped: int


def load_records(source: str, columns: dict[str, str] | None = None, allow_empty: bool = False,
                 need_output: bool = True) -> LoadedData:
    """Reads, maps, validates and de-duplicates one source; raises :class:`DataError` on the first bad record.

    ``columns`` maps our field names to the source's, e.g. ``{"output": "response"}``. Empty
    instructions and outputs are errors unless ``allow_empty`` (for the cleaner, which drops them);
    without ``need_output`` (prompts to generate for) a missing output is read as empty.
    """
    columns = {field: (columns or {}).get(field, field) for field in FIELDS}
    label, raw = _read_source(source)
    records = [_validate(record, where, label, columns, allow_empty, need_output) for where, record in raw]
    seen: set[tuple[str, ...]] = set()
    unique = []
    for record in records:
        key = tuple(record[f] for f in FIELDS)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return LoadedData(records=unique, source=label, duplicates_dropped=len(records) - len(unique))


def _read_source(source: str) -> tuple[str, Iterable[tuple[str, Any]]]:
    """Returns a label for messages and (location, record) pairs."""
    if source.startswith("builtin:"):
        from alpaca_lora.data.builtin import builtin_dataset

        name = source.removeprefix("builtin:")
        try:
            records = builtin_dataset(name)
        except KeyError as exc:
            raise DataError(f"{source}: {exc.args[0]}") from None
        return source, ((f"record [{i}]", r) for i, r in enumerate(records))
    if source.startswith(("http://", "https://")):
        path = download(source)
        return source, _read_file(path, label=source)
    path = Path(source).expanduser()
    if path.is_file():
        return str(path), _read_file(path, label=str(path))
    if path.suffix in {".json", ".jsonl"} or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file")
    return source, _read_hub_dataset(source)


def _read_file(path: Path, label: str) -> list[tuple[str, Any]]:
    text = read_text(path, label)
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        return [(f"line {number}", record) for number, record in parse_json_lines(text, label)]
    data = parse_json(text, label)
    if not isinstance(data, list):
        raise DataError(f"{label}: expected a JSON list of records, found a JSON {type(data).__name__}")
    return [(f"record [{i}]", record) for i, record in enumerate(data)]


def _read_hub_dataset(name: str) -> Iterable[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:  # the hub raises many types; the user needs the message
        raise DataError(f"{name}: not a local file and could not be loaded as a Hugging Face dataset: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return ((f"record [{i}]", r) for i, r in enumerate(dataset))


def _validate(record: Any, where: str, label: str, columns: dict[str, str], allow_empty: bool,
              need_output: bool) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"{label}: {where}: expected an object with {list(columns.values())}, "
                        f"found a JSON {type(record).__name__}")
    clean = {}
    for field, column in columns.items():
        value = record.get(column)
        if value is None and (field == "input" or (field == "output" and not need_output)):
            value = ""  # no input (Stanford's data), or no output yet (prompts to answer)
        if value is None:
            raise DataError(f"{label}: {where}: field '{column}' is missing")
        if not isinstance(value, str):
            raise DataError(f"{label}: {where}: field '{column}' must be a string, found {type(value).__name__}")
        required = field == "instruction" or (field == "output" and need_output)
        if required and not value.strip() and not allow_empty:
            raise DataError(f"{label}: {where}: field '{column}' is empty")
        clean[field] = value
    return clean


def download(url: str) -> Path:
    """Downloads ``url`` once into the cache (atomically) and returns the local path."""
    name = Path(url.split("?", 1)[0]).name or "data"
    target = cache_dir("downloads") / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"{url}: download failed: {exc}") from None
    return target
