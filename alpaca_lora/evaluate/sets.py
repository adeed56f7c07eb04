"""Evaluation sets: the instructions both sides answer, each item as ``id``, ``key``, ``instruction``,
``input``, ``category`` and ``reference`` (the expected answer, where the set has one).

- ``self-instruct-252`` (the default): Self-Instruct's 252 user-oriented instructions, the set of
  Alpaca's blind comparison, downloaded once into the cache (or that file's local path). Each item's
  instance input is used; ``motivation_app`` is its category, ``selfinstruct`` (AlpacaEval's name for
  this subset) its dataset.
- AlpacaEval's format: a JSON list with ``instruction``, ``output`` (the reference), ``generator`` and
  ``dataset`` (the category); inputs are already folded into the instruction.
- MT-Bench's format (``question.jsonl``): ``turns``, a list of user messages (two in MT-Bench), with
  ``question_id``, ``category`` and ``reference`` (a list, where a category has them). Each turn is an item
  (id ``QUESTION.TURN``); a later turn is answered with the model's own earlier answers in its history, and
  is judged by the same judge as the others: its input quotes the user's earlier messages, its output shows the
  generator's own earlier answers before the answer to judge.
- Anything the training data loader reads in the Alpaca format (.json/.jsonl, URL, ``builtin:NAME``).

``held_out=DIR`` takes the items a training run held out: the validation split of its data, drawn
again from the run's own ``training_config.yaml``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from alpaca_lora.common.errors import DataError, UserError
from alpaca_lora.common.jsonfiles import parse_json, parse_json_lines, read_text
from alpaca_lora.data.loading import download, load_records

SELF_INSTRUCT_HOME = "https://raw.githubusercontent.com/yizhongw/self-instruct/main/human_eval"
NAMED_SETS = {"self-instruct-252": f"{SELF_INSTRUCT_HOME}/user_oriented_instructions.jsonl"}
DEFAULT_SET = "self-instruct-252"
SELF_INSTRUCT_SUBSET = "selfinstruct"  # AlpacaEval's name for these 252 instructions


@dataclass
class EvalSet:
    items: list[dict]
    source: str


def fold(instruction: str, input_text: str = "") -> str:
    """Instruction and input as one text, as AlpacaEval stores them."""
    return instruction.strip() + (f"\n\n{input_text.strip()}" if input_text.strip() else "")


def item_key(instruction: str, input_text: str = "") -> str:
    """Names an instruction (with its input) in every format: answers are paired by it, judgments cached by it."""
    return hashlib.sha256(" ".join(fold(instruction, input_text).split()).encode()).hexdigest()[:16]


def make_item(item_id: str, instruction: str, input_text: str, category: str | None, reference: str | None,
              dataset: str | None = None) -> dict:
    """One item; ``dataset`` is the set it belongs to as AlpacaEval names its subsets (``selfinstruct``, ...)."""
    return {"id": item_id, "key": item_key(instruction, input_text), "instruction": instruction, "input": input_text,
            "category": category or None, "reference": reference if reference and reference.strip() else None,
            "dataset": dataset or None}


def set_name(source: str) -> str:
    """A set's short name for AlpacaEval's ``dataset``: ``builtin:skills`` is skills, ``org/alpaca.json`` alpaca."""
    return Path(source.split(":")[-1].split("?")[0]).stem or "none"


def read_json_records(path: Path, label: str) -> list[tuple[str, object]]:
    """(location, record) pairs of a JSON list or a JSONL file."""
    text = read_text(path, label)
    if text.lstrip().startswith("["):
        return [(f"record [{i}]", record) for i, record in enumerate(parse_json(text, label))]
    return [(f"line {number}", record) for number, record in parse_json_lines(text, label)]


def text_field(record: object, name: str, where: str, label: str, required: bool = True) -> str | None:
    """A string field of a record, or one clear line naming the file, the record and the field."""
    if not isinstance(record, dict):
        raise DataError(f"{label}: {where}: expected a JSON object, found a JSON {type(record).__name__}")
    value = record.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        found = "it is missing" if value is None else f"found {type(value).__name__}"
        raise DataError(f"{label}: {where}: field '{name}' must be a string ({found})")
    return value


def load_eval_set(spec: str | None = None, held_out: str | None = None, limit: int | None = None) -> EvalSet:
    """The set named by ``spec`` (or the items ``held_out`` names), at most ``limit`` items; checked whole."""
    if held_out:
        eval_set = _held_out(held_out, spec)
    else:
        eval_set = _load(spec or DEFAULT_SET)
    if not eval_set.items:
        raise DataError(f"{eval_set.source}: no items")
    keys: dict[str, str] = {}
    for item in eval_set.items:
        if item["key"] in keys:
            raise DataError(f"{eval_set.source}: items '{keys[item['key']]}' and '{item['id']}' are the same "
                            "instruction and input")
        keys[item["key"]] = item["id"]
    if limit is not None:
        eval_set.items = eval_set.items[:limit]
    return eval_set


def _load(spec: str) -> EvalSet:
    if spec in NAMED_SETS or spec.startswith(("http://", "https://")):
        return download(NAMED_SETS.get(spec, spec), _read_set_file)  # checked before it enters the cache
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_set_file(path, spec)
    return _alpaca(spec, spec)  # builtin:NAME, a hub dataset id, or a path the loader explains


def _read_set_file(path: Path, label: str) -> EvalSet:
    """Self-Instruct's format, MT-Bench's, AlpacaEval's, or else Alpaca's, told apart by the first record's fields."""
    records = read_json_records(path, label)
    first = records[0][1] if records else {}
    if isinstance(first, dict) and "turns" in first:
        return EvalSet([item for where, record in records for item in _mt_bench_items(record, where, label)], label)
    if isinstance(first, dict) and "instances" in first:
        return EvalSet([_self_instruct_item(record, where, label) for where, record in records], label)
    if isinstance(first, dict) and "input" not in first and ({"dataset", "generator"} & set(first)):
        return EvalSet([_alpaca_eval_item(record, where, label, number)
                        for number, (where, record) in enumerate(records)], label)
    return _alpaca(str(path), label)


def _self_instruct_item(record: object, where: str, label: str) -> dict:
    instruction = text_field(record, "instruction", where, label)
    instances = record.get("instances")
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise DataError(f"{label}: {where}: field 'instances' must be a non-empty list of objects")
    input_text = text_field(instances[0], "input", where, label, required=False) or ""
    reference = text_field(instances[0], "output", where, label, required=False)
    item_id = text_field(record, "id", where, label, required=False) or where
    category = text_field(record, "motivation_app", where, label, required=False)
    return make_item(item_id, instruction, input_text, category, reference, SELF_INSTRUCT_SUBSET)


def _mt_bench_items(record: object, where: str, label: str) -> list[dict]:
    """One item per turn of an MT-Bench question; a later turn's item knows the user's earlier messages
    (``turns``) and the item of the turn before (``previous``), whose answer goes into its history."""
    turns = record.get("turns") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise DataError(f"{label}: {where}: field 'turns' must be a non-empty list of non-empty strings (the user's "
                        "messages)")
    references = record.get("reference") or []
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise DataError(f"{label}: {where}: field 'reference' must be a list of strings, one per turn")
    question = str(record.get("question_id", where))
    category = text_field(record, "category", where, label, required=False)
    items, previous = [], None
    for number, turn in enumerate(turns, start=1):
        reference = references[number - 1] if number <= len(references) else None
        item = make_item(f"{question}.{number}", turn, earlier_turns(turns[: number - 1]), category, reference)
        items.append({**item, "turns": turns[:number], "previous": previous})
        previous = item["key"]
    return items


def earlier_turns(turns: list[str]) -> str:
    """A later turn's input, for the judge: the user's earlier messages (the same for every generator, so that
    answers pair by it; each generator's own earlier answers are in its response, see ``answered_in_turns``)."""
    if not turns:
        return ""
    said = "\n\n".join(f"[User, turn {number}]\n{turn}" for number, turn in enumerate(turns, start=1))
    return (f"This instruction is turn {len(turns) + 1} of a conversation; earlier, the user said:\n\n{said}\n\n"
            "Each response begins with that assistant's own earlier answers; judge its answer to this instruction.")


def answered_in_turns(earlier: list[str], answer: str) -> str:
    """A later turn's output, for the judge: the generator's earlier answers in the conversation, then its answer."""
    shown = [f"[Assistant, turn {number}]\n{text}" for number, text in enumerate(earlier, start=1)]
    return "\n\n".join(shown + [f"[Assistant, turn {len(earlier) + 1}: the answer to this instruction]\n{answer}"])


def _alpaca_eval_item(record: object, where: str, label: str, number: int) -> dict:
    instruction = text_field(record, "instruction", where, label)
    reference = text_field(record, "output", where, label, required=False)
    dataset = text_field(record, "dataset", where, label, required=False)
    return make_item(str(number), instruction, "", dataset, reference, dataset)


def _alpaca(source: str, label: str) -> EvalSet:
    data = load_records(source, need_output=False)
    return EvalSet([make_item(str(i), r["instruction"], r["input"], None, r["output"], set_name(source))
                    for i, r in enumerate(data.records)], label)


def _held_out(directory: str, spec: str | None) -> EvalSet:
    from alpaca_lora.data.examples import split_records  # datasets: only for this
    from alpaca_lora.model_args import saved_config

    trained = saved_config(directory)
    if not trained.get("data"):
        raise UserError(f"held_out={directory}: no training_config.yaml of a training run there")
    if spec and spec != trained["data"]:
        raise UserError(f"held_out={directory} was trained on {trained['data']}, not set={spec}: leave set= out")
    if not trained.get("val_set_size"):
        raise UserError(f"held_out={directory}: that run trained on all of {trained['data']} (val_set_size=0); "
                        "nothing was held out")
    data = load_records(trained["data"], trained.get("columns") or None)
    _, held = split_records(data.records, trained["val_set_size"], trained.get("seed", 42))
    return EvalSet([make_item(str(i), r["instruction"], r["input"], None, r["output"], set_name(trained["data"]))
                    for i, r in enumerate(held)], f"{trained['data']} (held out by {directory})")
