"""Loading and validating records, before any model is loaded.

A source is a local ``.json`` (a list of records) or ``.jsonl`` file, an http(s) URL (downloaded
once into the cache, and only once it has been read and validated), ``builtin:NAME`` (a set this
package generates), or a Hugging Face dataset id such as ``tatsu-lab/alpaca``. Its format is told by
its first record and every record must share it:

- Alpaca (``instruction``, ``input``, ``output``): every record comes out as ``{instruction, input, output}``;
- OpenAI ``messages`` (``role`` system/user/assistant, ``content``; an assistant turn's ``weight`` 0 keeps it
  out of the loss) and ShareGPT ``conversations`` (``from`` system/human/gpt, ``value``): conversations, which
  only training reads, each coming out as ``{"messages": [{role, content[, weight]}, ...]}`` with OpenAI's roles.
  A conversation is system messages (optional), then user and assistant turns in turn, ending with an answer.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from tqdm.auto import tqdm

from alpaca_lora.common.errors import DataError
from alpaca_lora.common.jsonfiles import parse_json, parse_json_lines, read_text
from alpaca_lora.common.paths import atomic_path, cache_dir
from alpaca_lora.data.templates import turn_order_problem

FIELDS = ("instruction", "input", "output")
# Each conversation format: its list field, the role and text fields of a turn, and its roles as OpenAI's.
CONVERSATION_FORMATS = {
    "messages": ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": ("conversations", "from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
}
FORMAT_NAMES = {"alpaca": "Alpaca (instruction, input, output)", "messages": "OpenAI 'messages'",
                "sharegpt": "ShareGPT 'conversations'"}
# Far above any instruction data set served as one file (Stanford's alpaca_data.json is 22 MB), far
# below what would exhaust memory when parsed; max_download_bytes= raises it.
MAX_DOWNLOAD_BYTES = 1 << 30
MAX_DOWNLOAD_HELP = "largest file an http(s) URL may download, in bytes; past it the download stops, nothing cached"
T = TypeVar("T")


@dataclass
class LoadedData:
    records: list[dict]
    source: str
    duplicates_dropped: int
    format: str = "alpaca"  # or messages, sharegpt: the records are then {"messages": [...]}

    @property
    def conversations(self) -> bool:
        return self.format != "alpaca"


def load_records(source: str, columns: dict[str, str] | None = None, allow_empty: bool = False,
                 need_output: bool = True, max_download_bytes: int = MAX_DOWNLOAD_BYTES,
                 conversations: bool = False) -> LoadedData:
    """Reads, maps, validates and de-duplicates one source; raises :class:`DataError` on the first bad record.

    ``columns`` maps our field names to the source's, e.g. ``{"output": "response"}``. Empty
    instructions and outputs are errors unless ``allow_empty`` (for the cleaner, which drops them);
    without ``need_output`` (prompts to generate for) a missing output is read as empty. Conversation
    files are read only with ``conversations`` (training); elsewhere they are refused in one line.
    """
    columns = {field: (columns or {}).get(field, field) for field in FIELDS}

    def validated(raw: Iterable[tuple[str, Any]], label: str) -> tuple[str, list[dict]]:
        kind, first, records = None, None, []
        for where, record in raw:
            found = _format_of(record)
            if kind is None:
                kind, first = found or "alpaca", where
                _check_format(kind, label, where, columns, conversations)
            elif found is not None and found != kind:
                raise DataError(f"{label}: {where}: a record in the {FORMAT_NAMES[found]} format, but the file's first "
                                f"({first}) is in the {FORMAT_NAMES[kind]} format; one format per file")
            records.append(_conversation(record, where, label, kind) if kind in CONVERSATION_FORMATS else
                           _validate(record, where, label, columns, allow_empty, need_output))
        return kind or "alpaca", records

    label, (kind, records) = _read_source(source, validated, max_download_bytes)
    seen: set[str | tuple[str, ...]] = set()
    unique = []
    for record in records:
        key = json.dumps(record["messages"], sort_keys=True) if "messages" in record else \
            tuple(record[f] for f in FIELDS)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return LoadedData(records=unique, source=label, duplicates_dropped=len(records) - len(unique), format=kind)


def _format_of(record: Any) -> str | None:
    """A record's format by its fields (None: not an object, left to the file's format to explain)."""
    if not isinstance(record, dict):
        return None
    return next((kind for kind, (field, *_) in CONVERSATION_FORMATS.items() if field in record), "alpaca")


def _check_format(kind: str, label: str, where: str, columns: dict[str, str], conversations: bool) -> None:
    if kind == "alpaca":
        return
    if not conversations:
        raise DataError(f"{label}: {where}: {FORMAT_NAMES[kind]} records are conversations, which only training "
                        "reads; this command takes Alpaca records (instruction, input, output)")
    mapped = {field: column for field, column in columns.items() if field != column}
    if mapped:
        raise DataError(f"{label}: {where}: {FORMAT_NAMES[kind]} records have no Alpaca fields to map; leave out "
                        f"columns ({', '.join(f'columns.{field}={column}' for field, column in mapped.items())})")


def _conversation(record: Any, where: str, label: str, kind: str) -> dict:
    """A conversation checked turn by turn (one line naming the turn and field at fault), in OpenAI's form."""
    field, role_key, text_key, roles = CONVERSATION_FORMATS[kind]
    turns = record.get(field) if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        found = f"a JSON {type(record).__name__}" if not isinstance(record, dict) else \
            "it is missing" if field not in record else "found an empty list" if turns == [] else \
            f"found {_json_type(turns)}"
        raise DataError(f"{label}: {where}: field '{field}' must be a non-empty list of turns ({found})")
    messages = [_turn(turn, f"{label}: {where}: {field}[{i}]", role_key, text_key, roles)
                for i, turn in enumerate(turns)]
    problem = turn_order_problem([message["role"] for message in messages], last=("assistant",))
    if problem:
        index, why = problem
        names = "" if kind == "messages" else " (ShareGPT's human is user, gpt is assistant)"
        raise DataError(f"{label}: {where}: {field}[{index}]: {why}{names}")
    return {"messages": messages}


def _turn(turn: Any, at: str, role_key: str, text_key: str, roles: dict[str, str]) -> dict:
    if not isinstance(turn, dict):
        raise DataError(f"{at}: expected an object with '{role_key}' and '{text_key}', found {_json_type(turn)}")
    role, text = turn.get(role_key), turn.get(text_key)
    if not isinstance(role, str):
        raise DataError(f"{at}: field '{role_key}' must be a string ({_found(role)})")
    if role not in roles:
        raise DataError(f"{at}: field '{role_key}': unknown role '{role}' (one of {', '.join(roles)})")
    if isinstance(text, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                      for p in text):
        text = "".join(part["text"] for part in text)  # OpenAI's content parts, text only
    if not isinstance(text, str):
        raise DataError(f"{at}: field '{text_key}' must be a string ({_found(text)})")
    if not text.strip():
        raise DataError(f"{at}: field '{text_key}' is empty")
    message = {"role": roles[role], "content": text}
    if turn.get("weight") is not None and role_key == "role":
        if roles[role] != "assistant" or turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool):
            raise DataError(f"{at}: field 'weight' must be 0 or 1, on an assistant turn (found {turn['weight']!r} on "
                            f"a {role} turn)")
        message["weight"] = turn["weight"]
    return message


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _found(value: Any) -> str:
    return "it is missing" if value is None else f"found {_json_type(value)}"


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
