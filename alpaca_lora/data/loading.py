"""Loading and validating Alpaca-format records, before any model is loaded.

A source is a local ``.json`` (a list of records) or ``.jsonl`` file, an http(s) URL (downloaded
once into the cache, and only once it has been read and validated), ``builtin:NAME`` (a set this
package generates), or a Hugging Face dataset id such as ``tatsu-lab/alpaca``. Every record comes
out as ``{instruction, input, output}``.
"""

from __future__ import annotations

import hashlib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from tqdm.auto import tqdm

from alpaca_lora.common.errors import DataError
from alpaca_lora.common.jsonfiles import parse_json, parse_json_lines, read_text
from alpaca_lora.common.paths import atomic_path, cache_dir

FIELDS = ("instruction", "input", "output")
# Far above any instruction data set served as one file (Stanford's alpaca_data.json is 22 MB), far
# below what would exhaust memory when parsed; max_download_bytes= raises it.
MAX_DOWNLOAD_BYTES = 1 << 30
MAX_DOWNLOAD_HELP = "largest file an http(s) URL may download, in bytes; past it the download stops, nothing cached"
T = TypeVar("T")


@dataclass
class LoadedData:
    records: list[dict[str, str]]
    source: str
    duplicates_dropped: int


def load_records(source: str, columns: dict[str, str] | None = None, allow_empty: bool = False,
                 need_output: bool = True, max_download_bytes: int = MAX_DOWNLOAD_BYTES) -> LoadedData:
    """Reads, maps, validates and de-duplicates one source; raises :class:`DataError` on the first bad record.

    ``columns`` maps our field names to the source's, e.g. ``{"output": "response"}``. Empty
    instructions and outputs are errors unless ``allow_empty`` (for the cleaner, which drops them);
    without ``need_output`` (prompts to generate for) a missing output is read as empty.
    """
    columns = {field: (columns or {}).get(field, field) for field in FIELDS}

    def validated(raw: Iterable[tuple[str, Any]], label: str) -> list[dict[str, str]]:
        return [_validate(record, where, label, columns, allow_empty, need_output) for where, record in raw]

    label, records = _read_source(source, validated, max_download_bytes)
    seen: set[tuple[str, ...]] = set()
    unique = []
    for record in records:
        key = tuple(record[f] for f in FIELDS)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return LoadedData(records=unique, source=label, duplicates_dropped=len(records) - len(unique))


def _read_source(source: str, validated: Callable[[Iterable[tuple[str, Any]], str], T],
                 max_download_bytes: int) -> tuple[str, T]:
    """A label for messages, and the source's (location, record) pairs passed through ``validated``
    (inside the download, so that a file with a bad record never enters the cache)."""
    if source.startswith("builtin:"):
        from alpaca_lora.data.builtin import builtin_dataset

        name = source.removeprefix("builtin:")
        try:
            records = builtin_dataset(name)
        except KeyError as exc:
            raise DataError(f"{source}: {exc.args[0]}") from None
        return source, validated(((f"record [{i}]", r) for i, r in enumerate(records)), source)
    if source.startswith(("http://", "https://")):
        return source, download(source, lambda path, label: validated(_read_file(path, label), label),
                                max_download_bytes)
    path = Path(source).expanduser()
    if path.is_file():
        return str(path), validated(_read_file(path, label=str(path)), str(path))
    if path.suffix in {".json", ".jsonl"} or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file")
    return source, validated(_read_hub_dataset(source), source)


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


def download(url: str, read: Callable[[Path, str], T], max_bytes: int = MAX_DOWNLOAD_BYTES) -> T:
    """``read(path, label)`` of ``url``'s file in the cache, downloaded first if it is not there yet.

    The download streams to a temporary file beside the cache (with a progress bar), stops past
    ``max_bytes``, and is read (parsed and validated) before it is renamed into the cache: a login
    page, a cut transfer or a file with a bad record never enters it, and the next attempt downloads
    again. An error about a file already in the cache names it (a file that changed at its source is
    downloaded again once its cached copy is deleted).
    """
    target = download_path(url)
    if target.exists():
        try:
            return read(target, f"{url} (cached as {target})")
        except DataError as exc:
            raise DataError(f"{exc}; if the file at the URL has changed since, delete the cached copy to "
                            "download it again") from None
    with atomic_path(target) as tmp:  # renamed into the cache only once read without error
        with tmp.open("wb") as out:
            _stream(url, out, max_bytes, target.name.partition("-")[2])
        with tmp.open("rb") as f:
            if f.read(512).lstrip()[:1] == b"<":
                raise DataError(f"{url}: the server sent an HTML page (a login or error page?), not data; "
                                "nothing was cached")
        try:
            result = read(tmp, url)
        except DataError as exc:
            raise DataError(f"{exc}; nothing was cached") from None
    return result


def download_path(url: str) -> Path:
    """Where ``url``'s file is cached: its name, after a hash of the whole URL."""
    name = Path(url.split("?", 1)[0]).name or "data"
    return cache_dir("downloads") / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


def _stream(url: str, out, max_bytes: int, name: str) -> None:
    advice = "nothing was cached (raise max_download_bytes to download it)"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            if total and total > max_bytes:
                raise DataError(f"{url}: {total} bytes, more than max_download_bytes={max_bytes}; {advice}")
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                while chunk := response.read(1 << 20):
                    received += len(chunk)
                    if received > max_bytes:
                        raise DataError(f"{url}: more than max_download_bytes={max_bytes}; stopped, {advice}")
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as exc:
        raise DataError(f"{url}: download failed: {exc}") from None
