"""Cleaning an Alpaca-format set with checkable heuristics, in the spirit of alpaca-cleaned: each
record is fixed or dropped for a named reason, and the report lists counts and examples."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

# An output that runs on into the next generated task: "...\n##\n10. Instruction: ..." and the like.
# A numbered "Input:"/"Output:" alone is an ordinary list item ("1. Input: type the data"), not a leak.
_LEAKED_TASK = re.compile(r"\n\s*#{2,}\s*\n\s*\d+\.\s*(?:Instruction|Input|Output)\s*:"
                          r"|\n\s*\d+\.\s*Instruction\s*:|\n\s*#{2,}\s*$")
_PLACEHOLDER_INPUTS = {"<noinput>", "<no input>", "noinput", "no input", "none", "n/a", "null", "<none>"}
_NO_OUTPUT = {"<nooutput>", "<no output>", "nooutput"}
_REFUSALS = ("as an ai language model", "as a language model", "i'm sorry, but as an ai", "i am sorry, but as an ai",
             "as an ai, i cannot", "i'm sorry, but i cannot", "i am sorry, but i cannot")
_OPEN_ENDINGS = tuple(",:;([{")
EXAMPLES_PER_REASON = 3


@dataclass
class CleanReport:
    rows_in: int
    kept: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    fixed: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def note(self, kind: Counter, reason: str, index: int, record: dict) -> None:
        kind[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append({"record": index, **record})

    def as_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": len(self.kept), "dropped": dict(self.dropped.most_common()),
                "fixed": dict(self.fixed.most_common()), "examples": dict(self.examples)}


def _normal(text: str) -> str:
    """Case and surrounding punctuation do not count; line breaks do (reformatting is a real task)."""
    return text.strip().strip(".!?\"'").lower()


def clean_records(records: list[dict], duplicates_already_dropped: int = 0) -> CleanReport:
    report = CleanReport(rows_in=len(records) + duplicates_already_dropped)
    if duplicates_already_dropped:
        report.dropped["duplicate"] = duplicates_already_dropped
    seen: set[tuple[str, str, str]] = set()
    for index, original in enumerate(records):
        record = {name: original[name].strip() for name in ("instruction", "input", "output")}
        if record != original:
            report.note(report.fixed, "whitespace", index, original)
        if record["input"].lower() in _PLACEHOLDER_INPUTS:
            report.note(report.fixed, "placeholder_input", index, original)
            record["input"] = ""
        if record["input"] and _normal(record["input"]) == _normal(record["instruction"]):
            report.note(report.fixed, "input_repeats_instruction", index, original)
            record["input"] = ""
        leak = _LEAKED_TASK.search(record["output"])
        if leak:
            report.note(report.fixed, "leaked_numbering", index, original)
            record["output"] = record["output"][: leak.start()].strip()
        reason = _drop_reason(record)
        key = (record["instruction"], record["input"], record["output"])
        if reason is None and key in seen:
            reason = "duplicate"
        if reason:
            report.note(report.dropped, reason, index, original)
            continue
        seen.add(key)
        report.kept.append(record)
    return report


def _drop_reason(record: dict) -> str | None:
    instruction, input_text, output = record["instruction"], record["input"], record["output"]
    if not instruction:
        return "empty_instruction"
    if not output or output.lower() in _NO_OUTPUT:
        return "empty_output"
    if output.count("```") % 2 or output.endswith(_OPEN_ENDINGS):
        return "truncated_output"
    if input_text and _normal(output) == _normal(input_text):
        return "output_repeats_input"
    if _normal(output) == _normal(instruction):
        return "output_repeats_instruction"
    if output.lower().startswith(_REFUSALS):
        return "refusal"
    return None
