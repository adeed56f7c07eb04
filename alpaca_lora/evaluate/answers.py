"""Answers files: what one generator answered on an evaluation set.

Ours is JSONL, one line per item: ``id``, ``key``, ``instruction``, ``input``, ``output``, ``generator``,
``category`` and ``reference`` (where the set has them), and the ``model`` and ``decoding`` settings used.
Beside it, the same answers in AlpacaEval's ``model_outputs`` form (a JSON list of ``instruction`` with the
input folded in, ``output``, ``generator``, ``dataset``), so ``alpaca_eval`` runs on them unchanged.

Wherever an answers file is expected, these are read too: AlpacaEval's form, Self-Instruct's
prediction files, and the names of the models whose answers Self-Instruct published
(``text-davinci-003`` ...: downloaded once into the cache).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from alpaca_lora.common.errors import DataError
from alpaca_lora.common.paths import atomic_write_text
from alpaca_lora.data.loading import download
from alpaca_lora.evaluate.sets import SELF_INSTRUCT_HOME, fold, make_item, read_json_records, text_field

# The answers Self-Instruct published for its 252 user-oriented instructions (human_eval/predictions/).
PUBLISHED = ("text-davinci-003", "text-davinci-002", "text-davinci-001", "davinci", "davinci-self-instruct",
             "davinci-self-instruct-and-superni-ft", "davinci-superni-ft", "davinci-t0-ft")


@dataclass
class Answers:
    generator: str
    records: list[dict]
    source: str


@dataclass
class Pair:
    """One item both sides answered."""

    key: str
    id: str
    instruction: str
    input: str
    category: str | None
    reference: str | None
    output_a: str
    output_b: str


def file_name(generator: str) -> str:
    """A generator's name as a file name: ``org/model`` becomes ``org_model``."""
    return re.sub(r"[^\w.+-]+", "_", generator).strip("_.") or "answers"


def published_url(name: str) -> str:
    return f"{SELF_INSTRUCT_HOME}/predictions/{name}_predictions.jsonl"


def load_answers(spec: str) -> Answers:
    """An answers file in any of the forms above, or a published generator's name."""
    if spec in PUBLISHED:
        return download(published_url(spec), lambda path, label: _read_answers(path, spec, spec))
    if spec.startswith(("http://", "https://")):
        name = Path(spec.split("?", 1)[0]).stem.removesuffix("_predictions")
        return download(spec, lambda path, label: _read_answers(path, spec, name))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"{spec}: no such answers file (nor one of the published answers: {', '.join(PUBLISHED)})")
    return _read_answers(path, spec, path.stem.removesuffix("_predictions"))


def _read_answers(path: Path, label: str, default_name: str) -> Answers:
    """The answers in ``path``; the generator is the one the records name, or ``default_name``."""
    records = [_answer(record, where, label, number) for number, (where, record)
               in enumerate(read_json_records(path, label))]
    if not records:
        raise DataError(f"{label}: no answers")
    names = {record.pop("named_by") for record in records} - {None}
    if len(names) > 1:
        raise DataError(f"{label}: answers of several generators ({', '.join(sorted(names))}); one file per generator")
    generator = names.pop() if names else default_name
    seen: dict[str, str] = {}
    for record in records:
        record["generator"] = generator
        if record["key"] in seen:
            raise DataError(f"{label}: items '{seen[record['key']]}' and '{record['id']}' answer the same "
                            "instruction and input")
        seen[record["key"]] = record["id"]
    return Answers(generator, records, label)


def _answer(record: object, where: str, label: str, number: int) -> dict:
    instruction = text_field(record, "instruction", where, label)
    input_text = text_field(record, "input", where, label, required=False) or ""
    if "response" in record and "output" not in record:  # Self-Instruct's predictions
        output, reference = text_field(record, "response", where, label), text_field(record, "target", where, label,
                                                                                     required=False)
    else:
        output, reference = text_field(record, "output", where, label), text_field(record, "reference", where, label,
                                                                                   required=False)
    dataset = text_field(record, "dataset", where, label, required=False)
    category = text_field(record, "category", where, label, required=False) or dataset
    item = make_item(text_field(record, "id", where, label, required=False) or str(number), instruction, input_text,
                     category, reference, dataset)
    return {**item, "output": output.strip(), "named_by": text_field(record, "generator", where, label, required=False)}


def pair_answers(a: Answers, b: Answers) -> tuple[list[Pair], int]:
    """Items both files answered, in ``a``'s order, and how many items only one of them answered."""
    b_by_key = {record["key"]: record for record in b.records}
    pairs = []
    for record in a.records:
        other = b_by_key.get(record["key"])
        if other is not None:
            pairs.append(Pair(record["key"], record["id"], record["instruction"], record["input"],
                              record["category"] or other["category"], record["reference"] or other["reference"],
                              record["output"], other["output"]))
    if not pairs:
        raise DataError(f"{a.source} and {b.source} answer no instruction in common: answers to the same set "
                        "are needed")
    return pairs, len(a.records) + len(b.records) - 2 * len(pairs)


def write_answers(path: Path, records: list[dict]) -> Path:
    """The JSONL answers and, beside them, AlpacaEval's ``model_outputs`` form; returns the latter's path."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    alpaca_eval = path.with_name(path.stem + ".alpaca_eval.json")
    outputs = [{"instruction": fold(r["instruction"], r["input"]), "output": r["output"], "generator": r["generator"],
                "dataset": r.get("dataset") or "none"} for r in records]
    atomic_write_text(alpaca_eval, json.dumps(outputs, indent=2, ensure_ascii=False) + "\n")
    return alpaca_eval
