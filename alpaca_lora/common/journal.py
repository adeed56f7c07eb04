"""The append-only JSONL journal that makes long jobs resumable: one line per finished unit of work
(a request, a batch of generations), written in one piece and flushed to disk, so a job killed at
any instant (even ``kill -9``) leaves at most one partial last line, which the next run drops."""

from __future__ import annotations

import json
import os
from pathlib import Path

from alpaca_lora.common.errors import DataError
from alpaca_lora.common.jsonfiles import decode, parse_json_lines


class Journal:
    def __init__(self, path: Path, required: str = "request"):
        self.path = Path(path)
        self.required = required  # the field every line of this kind of journal has

    def read(self) -> list[dict]:
        """Every complete entry; a torn last line (a crash mid-write) is cut off the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        entries = []
        lines = parse_json_lines(decode(complete, str(self.path)), str(self.path),
                                 "; the journal was edited or is not ours")
        for number, entry in lines:
            if not isinstance(entry, dict) or self.required not in entry:
                raise DataError(f"{self.path}: line {number}: field '{self.required}' is missing; "
                                "not a file this command wrote")
            entries.append(entry)
        if len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        return entries

    def append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def check_record(self, number: int, index, instruction: str | None, records: list[dict], source: str) -> int:
        """The index of the input record a journal line is about, checked: a changed input file must
        not be resumed as if it were the one the journal was written for."""
        if not isinstance(index, int) or not 0 <= index < len(records) or records[index]["instruction"] != instruction:
            raise DataError(f"{self.path}: line {number}: record [{index}] is not the one in {source}; "
                            "was the input changed? use another output file")
        return index

    def done_indices(self, records: list[dict], source: str) -> set[int]:
        """The input records already answered (lines with ``index`` and ``instruction``), checked."""
        return {self.check_record(number, entry["index"], entry.get("instruction"), records, source)
                for number, entry in enumerate(self.read(), start=1)}
