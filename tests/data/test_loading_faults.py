"""The data layer under faults and bad input: a download is checked before it enters the
cache, is streamed under a size limit, and errors about a cached file name it; a UTF-8 byte-order
mark is read; deep nesting is one line. Downloads come from an http.server on loopback."""

from __future__ import annotations

import http.server
import json
import os
import threading
import tracemalloc
from pathlib import Path

import pytest

from alpaca_lora.common.errors import DataError, UserError
from alpaca_lora.common.journal import Journal
from alpaca_lora.data.loading import load_records
from alpaca_lora.data.self_instruct.tasks import load_seed_tasks

RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, sleep, move."},
    {"instruction": "Reverse the order of the words.", "input": "apple river", "output": "river apple"},
]
LOGIN_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body><form>...</form></body></html>\n"
SEED = {"instruction": "Name a color.", "instances": [{"input": "", "output": "Blue."}]}
MIB = 1 << 20


class Served:
    """One scripted reply: ``body`` bytes, or ``stream`` bytes sent ``repeat`` times (lazily, so a
    huge reply costs the server nothing), with or without a Content-Length."""

    def __init__(self, body: bytes = b"", content_type: str = "application/json", stream: bytes = b"",
                 repeat: int = 0, length: bool = True):
        self.body, self.content_type, self.stream, self.repeat, self.length = body, content_type, stream, repeat, length

    @property
    def size(self) -> int:
        return len(self.body) + len(self.stream) * self.repeat


class Loopback:
    """A http.server in a thread on 127.0.0.1 answering GETs from a script (the last reply repeats)."""

    def __init__(self, *script: Served):
        self.script, self.requests, self.bytes_sent = list(script), [], 0
        loopback = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                reply = loopback.script[min(len(loopback.requests), len(loopback.script) - 1)]
                loopback.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", reply.content_type)
                if reply.length:
                    self.send_header("Content-Length", str(reply.size))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(reply.body)
                    loopback.bytes_sent += len(reply.body)
                    for _ in range(reply.repeat):
                        self.wfile.write(reply.stream)
                        loopback.bytes_sent += len(reply.stream)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: what a size limit does
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/files/{name}"

    def __enter__(self) -> "Loopback":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("no_proxy", "NO_PROXY"):  # never route the loopback server through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def cached_files() -> list[Path]:
    downloads = Path(os.environ["ALPACA_LORA_CACHE"]) / "downloads"
    return sorted(downloads.iterdir()) if downloads.is_dir() else []


def one_line(exc_info, *needles) -> str:
    message = str(exc_info.value)
    assert isinstance(exc_info.value, UserError)
    assert message and "\n" not in message, repr(message)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --- downloads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alpaca_data.json", "alpaca_data.jsonl", "data"])
def test_a_login_page_is_never_cached_and_the_fixed_file_is_downloaded_next_time(tmp_path, name):
    fixed = json.dumps(RECORDS).encode()
    if name.endswith(".jsonl"):
        fixed = b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS)
    with Loopback(Served(LOGIN_PAGE, content_type="text/html"), Served(fixed)) as server:
        url = server.url(name)
        with pytest.raises(DataError) as exc_info:
            load_records(url)
        one_line(exc_info, url, "HTML")
        assert cached_files() == []  # nothing entered the cache, not even a partial file
        assert load_records(url).records == RECORDS  # the server is fixed: downloaded again
        assert len(server.requests) == 2
    assert load_records(url).records == RECORDS  # and now cached (the server is gone)


def test_a_download_that_is_not_valid_data_is_not_cached(tmp_path):
    cut = json.dumps(RECORDS).encode()[:-20]  # a cut transfer, or a JSON error page
    bad_record = json.dumps([RECORDS[0], {"instruction": "No output"}]).encode()
    with Loopback(Served(cut), Served(bad_record), Served(json.dumps(RECORDS).encode())) as server:
        url = server.url("data.json")
        with pytest.raises(DataError) as exc_info:
            load_records(url)
        one_line(exc_info, url, "not valid JSON")
        with pytest.raises(DataError) as exc_info:
            load_records(url)
        one_line(exc_info, url, "record [1]", "'output'")
        assert cached_files() == []
        assert load_records(url).records == RECORDS


def test_an_error_about_a_cached_file_names_its_cache_path(tmp_path):
    with Loopback(Served(json.dumps(RECORDS).encode())) as server:
        url = server.url("data.json")
        load_records(url)
    [cached] = cached_files()
    cached.write_text('[{"instruction": "a", "output": "b"}, {"instr')  # damaged since (disk, an older version)
    with pytest.raises(DataError) as exc_info:
        load_records(url)
    one_line(exc_info, url, str(cached), "not valid JSON")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked-stream"])
def test_a_download_past_max_download_bytes_stops_streams_and_caches_nothing(tmp_path, capsys, declared):
    huge = Served(b"[", stream=json.dumps(RECORDS[0]).encode().ljust(MIB - 1) + b",", repeat=256, length=declared)
    with Loopback(huge) as server:
        url = server.url("huge.json")
        tracemalloc.start()
        try:
            with pytest.raises(DataError) as exc_info:
                load_records(url, max_download_bytes=4 * MIB)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        one_line(exc_info, url, "max_download_bytes=4194304")
        assert server.bytes_sent < 64 * MIB  # stopped reading: 256 MiB were on offer
    assert peak < 16 * MIB, peak  # streamed to disk, never held in memory
    assert cached_files() == []
    if not declared:
        assert "downloading huge.json" in capsys.readouterr().err  # the progress bar


def test_max_download_bytes_is_a_training_key_checked_before_the_model(tmp_path, capsys):
    from alpaca_lora.train.run import main

    with Loopback(Served(json.dumps(RECORDS * 50).encode())) as server:
        url = server.url("data.json")
        with pytest.raises(SystemExit) as stopped:
            main(["recipe=qlora", "model=/nonexistent/model", f"data={url}", f"output_dir={tmp_path / 'out'}",
                  "device=cpu", "max_download_bytes=1000"])
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {url}") and "max_download_bytes=1000" in last
    assert cached_files() == []


def test_seed_tasks_downloads_are_checked_and_limited_the_same_way(tmp_path):
    seeds = b"".join(json.dumps({**SEED, "instruction": f"Name color {i}."}).encode() + b"\n" for i in range(3))
    with Loopback(Served(LOGIN_PAGE, content_type="text/html"), Served(seeds)) as server:
        url = server.url("seed_tasks.jsonl")
        with pytest.raises(DataError) as exc_info:
            load_seed_tasks(url)
        one_line(exc_info, url, "HTML")
        assert cached_files() == []
        with pytest.raises(DataError) as exc_info:
            load_seed_tasks(url, max_download_bytes=100)
        one_line(exc_info, url, "max_download_bytes=100")
        assert len(load_seed_tasks(url)) == 3


# --- byte-order marks and deep nesting ----------------------------------------------------------------

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("kind", ["json", "jsonl", "seed_tasks", "journal"])
def test_a_utf8_byte_order_mark_is_read(tmp_path, kind):
    if kind == "json":
        path = tmp_path / "data.json"
        path.write_bytes(BOM + json.dumps(RECORDS).encode())
        assert load_records(str(path)).records == RECORDS
    elif kind == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_bytes(BOM + b"".join(json.dumps(r).encode() + b"\r\n" for r in RECORDS))  # as Notepad saves it
        assert load_records(str(path)).records == RECORDS
    elif kind == "seed_tasks":
        path = tmp_path / "seed_tasks.jsonl"
        path.write_bytes(BOM + json.dumps(SEED).encode() + b"\n")
        assert load_seed_tasks(str(path)) == [{"instruction": "Name a color.", "input": "", "output": "Blue."}]
    else:
        path = tmp_path / "data.journal.jsonl"
        path.write_bytes(BOM + json.dumps({"request": 0, "records": []}).encode() + b"\n")
        journal = Journal(path)
        assert journal.read() == [{"request": 0, "records": []}]
        journal.append({"request": 1, "records": []})
        assert [entry["request"] for entry in journal.read()] == [0, 1]


DEEP = 100_000


@pytest.mark.parametrize("kind", ["json", "json-record", "jsonl", "seed_tasks"])
def test_deeply_nested_json_is_one_line_not_a_recursion_error(tmp_path, kind):
    nested = "[" * DEEP + "]" * DEEP
    if kind == "json":
        path, text, where = tmp_path / "data.json", nested, None
    elif kind == "json-record":
        path, where = tmp_path / "data.json", None
        text = json.dumps(RECORDS)[:-1] + ', {"instruction": "a", "output": "b", "meta": ' + nested + "}]"
    else:
        path, where = tmp_path / ("seeds.jsonl" if kind == "seed_tasks" else "data.jsonl"), "line 2"
        text = json.dumps(SEED if kind == "seed_tasks" else RECORDS[0]) + "\n" + nested + "\n"
    path.write_text(text)
    with pytest.raises(DataError) as exc_info:
        load_seed_tasks(str(path)) if kind == "seed_tasks" else load_records(str(path))
    one_line(exc_info, str(path), "nested too deeply", *([where] if where else []))
