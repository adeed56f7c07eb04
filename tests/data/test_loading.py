"""Loading and validating Alpaca-format records: files, column mapping, duplicates, URLs, errors."""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest

from alpaca_lora.common.errors import DataError, UserError
from alpaca_lora.data.loading import LoadedData, load_records

RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, sleep, move."},
    {"instruction": "Reverse the order of the words.", "input": "apple river", "output": "river apple"},
    {"instruction": "What is 12 plus 30?", "input": "", "output": "42"},
]


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- happy paths -----------------------------------------------------------------------------------


def test_json_list(tmp_path):
    path = _write_json(tmp_path / "data.json", RECORDS)
    data = load_records(str(path))
    assert isinstance(data, LoadedData)
    assert data.records == RECORDS
    assert data.duplicates_dropped == 0
    assert data.source == str(path)


def test_jsonl_with_blank_lines(tmp_path):
    lines = [json.dumps(RECORDS[0]), "", "   ", json.dumps(RECORDS[1]), "", json.dumps(RECORDS[2]), ""]
    path = _write_jsonl(tmp_path / "data.jsonl", lines)
    data = load_records(str(path))
    assert data.records == RECORDS
    assert data.duplicates_dropped == 0


def test_records_have_exactly_the_three_fields(tmp_path):
    extra = [dict(r, id=i, category="x") for i, r in enumerate(RECORDS)]
    data = load_records(str(_write_json(tmp_path / "data.json", extra)))
    assert data.records == RECORDS
    assert all(list(r) == ["instruction", "input", "output"] for r in data.records)


def test_column_mapping(tmp_path):
    raw = [{"prompt": r["instruction"], "context": r["input"], "response": r["output"], "instruction": "ignored"}
           for r in RECORDS]
    path = _write_json(tmp_path / "mapped.json", raw)
    data = load_records(str(path), columns={"instruction": "prompt", "input": "context", "output": "response"})
    assert data.records == RECORDS


def test_partial_column_mapping_keeps_other_names(tmp_path):
    raw = [{"instruction": r["instruction"], "input": r["input"], "response": r["output"]} for r in RECORDS]
    data = load_records(str(_write_json(tmp_path / "mapped.json", raw)), columns={"output": "response"})
    assert data.records == RECORDS


def test_missing_or_null_input_becomes_empty(tmp_path):
    raw = [
        {"instruction": "a", "output": "1"},
        {"instruction": "b", "input": None, "output": "2"},
        {"instruction": "c", "input": "", "output": "3"},
        {"instruction": "d", "input": "x", "output": "4"},
    ]
    data = load_records(str(_write_json(tmp_path / "data.json", raw)))
    assert [r["input"] for r in data.records] == ["", "", "", "x"]


def test_exact_duplicates_dropped_first_kept_order_preserved(tmp_path):
    a, b, c = RECORDS
    near_a = dict(a, output=a["output"] + " ")  # differs in one byte: not a duplicate
    raw = [a, b, a, c, b, near_a, a, dict(a, input=None)]  # input None == "" after normalization
    data = load_records(str(_write_json(tmp_path / "data.json", raw)))
    assert data.records == [a, b, c, near_a]
    assert data.duplicates_dropped == 4


def test_builtin_skills():
    first = load_records("builtin:skills")
    second = load_records("builtin:skills")
    assert first.source == "builtin:skills"
    assert len(first.records) == 3000
    assert first.duplicates_dropped == 0
    assert len({tuple(r.values()) for r in first.records}) == 3000
    assert first.records == second.records
    for record in first.records:
        assert set(record) == {"instruction", "input", "output"}
        assert record["instruction"].strip() and record["output"].strip()


def test_builtin_unknown():
    with pytest.raises(DataError) as exc_info:
        load_records("builtin:nope")
    _assert_one_line(exc_info, "builtin:nope", "skills")


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_url_downloaded_once_into_cache(tmp_path, monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):  # never route the local server through a proxy
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    handler = type("Handler", (_Handler,), {"body": json.dumps(RECORDS).encode(), "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/some/alpaca_data.json?rev=1"
    try:
        first = load_records(url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert first.records == RECORDS
    assert first.source == url
    assert handler.requests == ["/some/alpaca_data.json?rev=1"]

    downloads = Path(os.environ["ALPACA_LORA_CACHE"]) / "downloads"
    files = [p for p in downloads.iterdir() if p.is_file()]
    assert len(files) == 1, files
    assert files[0].name.endswith("alpaca_data.json")
    assert json.loads(files[0].read_text()) == RECORDS

    # The server is gone: a second load must come from the cache.
    second = load_records(url)
    assert second.records == RECORDS
    assert handler.requests == ["/some/alpaca_data.json?rev=1"]
    assert [p for p in downloads.iterdir() if p.is_file()] == files


def test_url_download_failure_is_data_error(monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    server.server_close()  # nothing listens on this port now
    url = f"http://127.0.0.1:{port}/gone.json"
    with pytest.raises(DataError) as exc_info:
        load_records(url)
    _assert_one_line(exc_info, url)
    downloads = Path(os.environ["ALPACA_LORA_CACHE"]) / "downloads"
    assert not any(downloads.iterdir())  # no partial file left behind


# --- validation errors ----------------------------------------------------------------------------


def _assert_one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert isinstance(exc_info.value, UserError)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    for needle in needles:
        assert needle in message, (needle, message)


def test_file_not_valid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n  {"instruction": ', encoding="utf-8")
    with pytest.raises(DataError) as exc_info:
        load_records(str(path))
    _assert_one_line(exc_info, str(path), "not valid JSON")


@pytest.mark.parametrize("top", [{"instruction": "a", "output": "b"}, "text", 3, None])
def test_json_top_level_not_a_list(tmp_path, top):
    path = _write_json(tmp_path / "data.json", top)
    with pytest.raises(DataError) as exc_info:
        load_records(str(path))
    _assert_one_line(exc_info, str(path), "list")


def test_jsonl_line_not_json(tmp_path):
    lines = [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1]), "{not json", json.dumps(RECORDS[2])]
    path = _write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError) as exc_info:
        load_records(str(path))
    _assert_one_line(exc_info, str(path), "line 4", "not valid JSON")
    assert "line 3" not in str(exc_info.value)


# Each case: the bad record, the field named in the message, and a fragment of the reason.
BAD_RECORDS = [
    pytest.param({"input": "", "output": "b"}, "instruction", "missing", id="missing-instruction"),
    pytest.param({"instruction": "a", "input": ""}, "output", "missing", id="missing-output"),
    pytest.param({"instruction": None, "output": "b"}, "instruction", "missing", id="null-instruction"),
    pytest.param({"instruction": "a", "output": 42}, "output", "string", id="output-number"),
    pytest.param({"instruction": ["a"], "output": "b"}, "instruction", "string", id="instruction-list"),
    pytest.param({"instruction": "a", "input": 7, "output": "b"}, "input", "string", id="input-number"),
    pytest.param({"instruction": "", "output": "b"}, "instruction", "empty", id="empty-instruction"),
    pytest.param({"instruction": "a", "output": ""}, "output", "empty", id="empty-output"),
    pytest.param({"instruction": "a", "output": " \n\t "}, "output", "empty", id="whitespace-output"),
]


@pytest.mark.parametrize("bad, field, reason", BAD_RECORDS)
def test_bad_record_in_json(tmp_path, bad, field, reason):
    path = _write_json(tmp_path / "data.json", [RECORDS[0], RECORDS[1], bad, RECORDS[2]])
    with pytest.raises(DataError) as exc_info:
        load_records(str(path))
    _assert_one_line(exc_info, str(path), "record [2]", f"'{field}'", reason)


@pytest.mark.parametrize("bad, field, reason", BAD_RECORDS)
def test_bad_record_in_jsonl(tmp_path, bad, field, reason):
    lines = [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1]), json.dumps(bad), json.dumps(RECORDS[2])]
    path = _write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError) as exc_info:
        load_records(str(path))
    _assert_one_line(exc_info, str(path), "line 4", f"'{field}'", reason)


def test_bad_record_names_the_mapped_column(tmp_path):
    raw = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": 5}]
    path = _write_json(tmp_path / "mapped.json", raw)
    with pytest.raises(DataError) as exc_info:
        load_records(str(path), columns={"instruction": "prompt", "output": "response"})
    _assert_one_line(exc_info, str(path), "record [1]", "'response'")


@pytest.mark.parametrize("bad", [["a", "b"], "a string", 3, None])
def test_record_not_an_object_json(tmp_path, bad):
    path = _write_json(tmp_path / "data.json", [RECORDS[0], bad])
    with pytest.raises(DataError) as exc_info:
        load_records(str(path))
    _assert_one_line(exc_info, str(path), "record [1]", "instruction", "output")


def test_record_not_an_object_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [json.dumps(RECORDS[0]), "[1, 2]"])
    with pytest.raises(DataError) as exc_info:
        load_records(str(path))
    _assert_one_line(exc_info, str(path), "line 2", "instruction", "output")


def test_first_bad_record_is_reported(tmp_path):
    path = _write_json(tmp_path / "data.json", [RECORDS[0], {"instruction": "a"}, {"output": "b"}])
    with pytest.raises(DataError) as exc_info:
        load_records(str(path))
    _assert_one_line(exc_info, "record [1]", "'output'")


@pytest.mark.parametrize("name", ["missing.json", "missing.jsonl", "sub/dir/missing.json"])
def test_nonexistent_path(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(DataError) as exc_info:
        load_records(str(path))
    _assert_one_line(exc_info, str(path), "no such file")


def test_nonexistent_relative_json_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as exc_info:
        load_records("data/missing.json")
    _assert_one_line(exc_info, "data/missing.json", "no such file")


# --- reference data ---------------------------------------------------------------------------------


def test_alpaca_en_demo(shared_data):
    path = shared_data / "alpaca_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert len(raw) == 999
    assert sum(bool(r.get("input")) for r in raw) == 412

    data = load_records(str(path))
    assert len(data.records) + data.duplicates_dropped == 999
    unique_raw = list(dict.fromkeys((r["instruction"], r.get("input") or "", r["output"]) for r in raw))
    assert [(r["instruction"], r["input"], r["output"]) for r in data.records] == unique_raw
    assert sum(bool(r["input"]) for r in data.records) == sum(bool(t[1]) for t in unique_raw)
