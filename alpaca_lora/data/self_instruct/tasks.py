"""Self-instruct tasks in Stanford Alpaca's numbered format: seed tasks, the generation prompt, reply
parsing and the per-instruction filters, each discard counted by its reason."""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_lora.common.errors import DataError
from alpaca_lora.common.jsonfiles import parse_json_lines, read_text
from alpaca_lora.data.loading import MAX_DOWNLOAD_BYTES, download

STANFORD_SEED_TASKS = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/seed_tasks.jsonl"

# Our own wording of the generation prompt. Stanford's ``prompt.txt`` works unchanged through
# ``prompt_file=``: both are followed by the same numbered examples and end by opening the next task.
DEFAULT_PROMPT = """\
We are building a dataset of instructions to teach an AI assistant to follow them. Write a list \
of 20 tasks. The first tasks of the list are given below as examples; continue the numbered list \
with new tasks, each different from the others, up to task 20.

Guidelines:
1. Vary the kind of task: open-ended writing, brainstorming, classification, rewriting and editing, \
extraction, summarising, reasoning, math, coding, advice and everyday questions.
2. Vary the wording: do not start most instructions with the same verb, and mix commands with questions.
3. Write each instruction in English, in one or two sentences.
4. Every task must be something a text-only language model can do: no images, audio or video, no \
browsing, and no actions in the world such as sending an email or setting a reminder.
5. Many tasks need an input: a concrete, realistic piece of text (at most 100 words) that the \
instruction works on, never a placeholder. When the instruction stands on its own, write <noinput>.
6. The output is a good, complete answer to the instruction and its input, in at most 100 words.
7. Keep the format of the examples exactly: the three numbered fields, and ### between tasks.

List of 20 tasks:"""

# Stanford's list of words naming things a language model cannot see or make.
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")

_FIELD = re.compile(r"(?m)^[ \t]*(\d+)\.[ \t]*(Instruction|Input|Output):")
_SEPARATOR = re.compile(r"(?m)^[ \t]*#{2,}[ \t]*$")
_NO_TEXT = {"<noinput>", "<nooutput>", "<no input>", "<no output>"}


@dataclass
class Parsed:
    records: list[dict[str, str]] = field(default_factory=list)
    discarded: Counter = field(default_factory=Counter)


def load_seed_tasks(source: str, max_download_bytes: int = MAX_DOWNLOAD_BYTES) -> list[dict[str, str]]:
    """Self-Instruct's seed tasks (JSONL, path or URL) as records: each task's first instance."""
    if source.startswith(("http://", "https://")):
        return download(source, _read_seed_tasks, max_download_bytes)
    return _read_seed_tasks(Path(source).expanduser(), source)


def _read_seed_tasks(path: Path, source: str) -> list[dict[str, str]]:
    seeds = []
    for number, task in parse_json_lines(read_text(path, source), source):
        instances = task.get("instances") if isinstance(task, dict) else None
        instruction = task.get("instruction") if isinstance(task, dict) else None
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{source}: line {number}: field 'instruction' is missing or empty")
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise DataError(f"{source}: line {number}: field 'instances' must be a non-empty list of objects")
        for name in ("input", "output"):
            if not isinstance(instances[0].get(name), str):
                raise DataError(f"{source}: line {number}: field 'instances[0].{name}' must be a string")
        seeds.append({"instruction": task["instruction"], "input": instances[0]["input"],
                      "output": instances[0]["output"]})
    if not seeds:
        raise DataError(f"{source}: no seed tasks")
    return seeds


def encode_prompt(prompt: str, examples: list[dict[str, str]]) -> str:
    """The generation prompt, the numbered example tasks, and the opening of the next task."""
    text = prompt + "\n"
    for number, task in enumerate(examples, start=1):
        instruction = re.sub(r"\s+", " ", task["instruction"]).strip().rstrip(":")
        text += (f"###\n{number}. Instruction: {instruction}\n"
                 f"{number}. Input:\n{task['input'] or '<noinput>'}\n"
                 f"{number}. Output:\n{task['output']}\n")
    return text + f"###\n{len(examples) + 1}. Instruction:"


def parse_reply(text: str, first_number: int, truncated: bool) -> Parsed:
    """Records from a reply that continues the numbered list at task ``first_number``.

    Tolerates a reply that repeats the opened ``N. Instruction:``, code fences, numbering that
    skips or restarts, and text around the tasks. A task whose three fields do not carry one number
    is ``unparseable``; when the reply hit the token limit its last task is dropped as ``truncated``.
    """
    result = Parsed()
    body = re.sub(r"^\s*```[^\n]*\n", "", text)
    body = re.sub(r"\n\s*```\s*$", "", body)
    if not re.match(r"\s*\d+\.[ \t]*Instruction:", body):
        body = f"{first_number}. Instruction:" + body
    pieces = [piece for piece in _SEPARATOR.split(body) if piece.strip()]
    if truncated and pieces:
        pieces.pop()
        result.discarded["truncated"] += 1
    for piece in pieces:
        parts = _FIELD.split(piece)
        # ['text before', n, 'Instruction', text, n, 'Input', text, n, 'Output', text]
        if (len(parts) != 10 or parts[2::3] != ["Instruction", "Input", "Output"]
                or len(set(parts[1::3])) != 1):
            if _FIELD.search(piece):  # a task, but broken; text with no fields at all is chatter
                result.discarded["unparseable"] += 1
            continue
        instruction, input_text, output = (part.strip() for part in parts[3::3])
        input_text = "" if input_text.lower() in _NO_TEXT else input_text
        output = "" if output.lower() in _NO_TEXT else output
        reason = instruction_problem(instruction) or ("empty_output" if not output else None)
        if reason:
            result.discarded[reason] += 1
        else:
            result.records.append({"instruction": instruction, "input": input_text, "output": output})
    return result


def instruction_problem(instruction: str) -> str | None:
    """Stanford's heuristic filters, in its order; returns the reason or None."""
    words = len(instruction.split())
    if words <= 3:
        return "too_short"
    if words > 150:
        return "too_long"
    if any(re.search(rf"\b{re.escape(word)}\b", instruction, flags=re.IGNORECASE)
           for word in BLACKLIST):
        return "blacklisted_word"
    if instruction.startswith("Write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_with_non_ascii"
    return None
