"""Prompt templates: the one place that turns an instruction (and input) into a prompt.

Training, generation, serving and evaluation all call :func:`get_template`, so a model is
always prompted exactly as it was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from alpaca_lora.errors import UserError

_STANFORD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
_STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt with and without an input; ``response_split`` marks where the answer begins."""

    name: str
    prompt_input: str
    prompt_no_input: str
    response_split: str = "### Response:"

    def format(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def response_from(self, text: str) -> str:
        """The answer part of a full prompt+answer text (everything after ``response_split``)."""
        return text.split(self.response_split, 1)[-1].strip()


BUILTIN_TEMPLATES = {
    # Stanford Alpaca (train.py's PROMPT_DICT), byte for byte.
    "alpaca": PromptTemplate("alpaca", _STANFORD_WITH_INPUT, _STANFORD_NO_INPUT),
    # tloen/alpaca-lora's templates/alpaca.json: the same text plus a newline after "### Response:".
    "alpaca_lora": PromptTemplate("alpaca_lora", _STANFORD_WITH_INPUT + "\n", _STANFORD_NO_INPUT + "\n"),
}


class TemplateError(UserError):
    pass


def load_template_file(path: str | Path) -> PromptTemplate:
    """Reads a user template: JSON or YAML with ``prompt_input`` and ``prompt_no_input``.

    alpaca-lora's ``templates/*.json`` files load unchanged (their ``description`` is ignored).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise TemplateError(f"{path}: cannot read template: {exc}".splitlines()[0]) from None
    if not isinstance(spec, dict):
        raise TemplateError(f"{path}: a template must be a mapping with 'prompt_input' and 'prompt_no_input'")
    for field in ("prompt_input", "prompt_no_input"):
        if not isinstance(spec.get(field), str):
            raise TemplateError(f"{path}: field '{field}' is missing or not a string")
    if "{instruction}" not in spec["prompt_input"] or "{input}" not in spec["prompt_input"]:
        raise TemplateError(f"{path}: field 'prompt_input' must contain {{instruction}} and {{input}}")
    if "{instruction}" not in spec["prompt_no_input"]:
        raise TemplateError(f"{path}: field 'prompt_no_input' must contain {{instruction}}")
    return PromptTemplate(
        name=path.stem,
        prompt_input=spec["prompt_input"],
        prompt_no_input=spec["prompt_no_input"],
        response_split=spec.get("response_split", "### Response:"),
    )


def get_template(name_or_path: str) -> PromptTemplate:
    """A built-in template by name, or a template file by path."""
    if name_or_path in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_path]
    if Path(name_or_path).suffix in {".json", ".yaml", ".yml"}:
        return load_template_file(name_or_path)
    raise TemplateError(
        f"unknown template '{name_or_path}': use one of {sorted(BUILTIN_TEMPLATES)} or a .json/.yaml file"
    )
