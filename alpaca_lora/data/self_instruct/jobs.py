"""The two modes that call the teacher: generate new tasks (self-instruct), regenerate outputs."""

from __future__ import annotations

import random
from collections import Counter

from alpaca_lora.common.errors import DataError
from alpaca_lora.common.journal import Journal
from alpaca_lora.data.near_duplicates import NearDuplicateIndex
from alpaca_lora.data.self_instruct.tasks import encode_prompt, parse_reply
from alpaca_lora.data.templates import PromptTemplate
from alpaca_lora.endpoint.client import Outcome


class GenerateJob:
    """Stanford's loop: example seed tasks in, new tasks out, filtered, kept until ``target``."""

    def __init__(self, seeds: list[dict], prompt: str, prompt_tasks: int, target: int, similarity: float,
                 seed: int):
        self.seeds, self.prompt, self.prompt_tasks, self.total, self.seed = seeds, prompt, prompt_tasks, target, seed
        self.kept: list[dict] = []
        self.index = NearDuplicateIndex(similarity)
        for task in seeds:
            self.index.add(task["instruction"])

    def restore(self, entries: list[dict], journal: Journal) -> None:
        for number, entry in enumerate(entries, start=1):
            if entry.get("mode") != "generate":
                raise DataError(f"journal line {number} was written by mode={entry.get('mode')}, not generate")
            for record in entry.get("records", []):
                self.kept.append(record)
                self.index.add(record["instruction"])

    def next_prompt(self, number: int) -> tuple[int, str]:
        examples = random.Random(f"{self.seed}:{number}").sample(self.seeds, self.prompt_tasks)
        return number, encode_prompt(self.prompt, examples)

    def accept(self, key: int, reply: Outcome) -> dict:
        if reply.problem:
            return {"records": [], "discarded": {}}
        parsed = parse_reply(reply.text, self.prompt_tasks + 1, truncated=reply.finish_reason == "length")
        discarded: Counter = parsed.discarded
        records = []
        for record in parsed.records:
            if self.finished():
                discarded["over_target"] += 1
            elif self.index.is_near_duplicate(record["instruction"]):
                discarded["similar"] += 1
            else:
                self.index.add(record["instruction"])
                self.kept.append(record)
                records.append(record)
        return {"records": records, "discarded": dict(discarded)}

    def done(self) -> int:
        return len(self.kept)

    def finished(self) -> bool:
        return len(self.kept) >= self.total

    def final_records(self) -> list[dict]:
        return self.kept[: self.total]


class RegenerateJob:
    """New outputs for existing instructions from a (stronger) teacher, as Alpaca-GPT4 did.

    The teacher sees exactly the prompt the fine-tuned model will see (the training template).
    """

    def __init__(self, records: list[dict], template: PromptTemplate, source: str):
        self.records, self.template, self.source = records, template, source
        self.total = len(records)
        self.regenerated: dict[int, dict] = {}
        self._pending = iter(range(len(records)))

    def restore(self, entries: list[dict], journal: Journal) -> None:
        for number, entry in enumerate(entries, start=1):
            if entry.get("mode") != "regenerate":
                raise DataError(f"journal line {number} was written by mode={entry.get('mode')}, not regenerate")
            if entry.get("records"):
                record = entry["records"][0]
                index = journal.check_record(number, entry["index"], record["instruction"], self.records, self.source)
                self.regenerated[index] = record
        self._pending = (i for i in range(len(self.records)) if i not in self.regenerated)

    def next_prompt(self, number: int) -> tuple[int, str] | None:
        index = next(self._pending, None)
        if index is None:
            return None
        record = self.records[index]
        return index, self.template.format(record["instruction"], record["input"])

    def accept(self, key: int, reply: Outcome) -> dict:
        if reply.problem:
            return {"index": key, "records": [], "discarded": {}}
        if reply.finish_reason == "length":
            return {"index": key, "records": [], "discarded": {"truncated": 1}}
        record = {**self.records[key], "output": reply.text.strip()}
        self.regenerated[key] = record
        return {"index": key, "records": [record], "discarded": {}}

    def done(self) -> int:
        return len(self.regenerated)

    def finished(self) -> bool:
        return len(self.regenerated) == len(self.records)

    def final_records(self) -> list[dict]:
        return [self.regenerated[i] for i in sorted(self.regenerated)]
