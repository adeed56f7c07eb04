"""Prompt templates: the one place that turns an instruction (and input) into a prompt.

Training, generation, serving and evaluation all call :func:`get_template`, so a model is
always prompted exactly as it was trained. The same template also travels with the model, as the
tokenizer's Jinja ``chat_template`` (vLLM, ``transformers serve``, llama.cpp) and as an Ollama
``TEMPLATE``, both mapping a conversation as this project's server does.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from alpaca_lora.common.errors import UserError

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


# How a conversation becomes one prompt, as the server maps it (alpaca_lora.serve.chat_prompt; the tests pin
# that they agree): the last message, from the user, is the instruction; the earlier ones are the input, one
# paragraph each, system (or developer) messages as they are and the others as "User: ...", "Assistant: ...".
CONTEXT_ROLES_VERBATIM = ("system", "developer")
CONTEXT_SEPARATOR = "\n\n"


def _pieces(template: PromptTemplate, prompt: str) -> list[tuple[str, str | None]]:
    """``(literal, field)`` pairs of a format string, ``field`` being ``instruction``, ``input`` or None."""
    pieces = []
    for literal, field, spec, conversion in string.Formatter().parse(prompt):
        if field not in (None, "instruction", "input") or spec or conversion:
            found = "{" + (field or "") + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise TemplateError(f"template '{template.name}': only {{instruction}} and {{input}} may appear in braces "
                                f"to export it as a chat template, not {found}")
        if pieces and pieces[-1][1] is None:  # str.format splits literal text at each escaped brace
            literal = pieces.pop()[0] + literal
        pieces.append((literal, field))
    return pieces


def chat_template(template: PromptTemplate, bos: bool) -> str:
    """A Jinja ``chat_template`` rendering a conversation as the server prompts it.

    With ``bos`` (the tokenizer adds BOS to a prompt itself) it starts with ``bos_token``: chat
    consumers tokenize the rendered text without special tokens (transformers, vLLM) or drop a
    leading BOS they add themselves (llama.cpp), so the ids are the training prompt's either way.
    Every literal is a quoted string and every tag trims whitespace, so no Jinja whitespace rule
    can add or drop a byte.
    """

    def render(prompt: str) -> str:
        parts = []
        for literal, field in _pieces(template, prompt):
            if literal:
                parts.append(json.dumps(literal, ensure_ascii=False))
            if field:
                parts.append(field)
        return "{{- " + " + ".join(parts) + " -}}"

    lines = [
        "{#- alpaca-lora: the '" + template.name + "' prompt template the model was trained with -#}",
        "{%- macro text(content) -%}",
        "{%- if content is string -%}{{- content -}}{%- else -%}{%- for part in content -%}{{- part['text'] -}}"
        "{%- endfor -%}{%- endif -%}",
        "{%- endmacro -%}",
        "{%- if messages | length == 0 or messages[-1]['role'] != 'user' -%}",
        "{{- raise_exception(\"the last message must have role 'user'\") -}}",
        "{%- endif -%}",
        "{%- set ns = namespace(input='') -%}",
        "{%- for message in messages[:-1] -%}",
        "{%- if not loop.first -%}{%- set ns.input = ns.input + " + json.dumps(CONTEXT_SEPARATOR) + " -%}{%- endif -%}",
        "{%- if message['role'] in " + json.dumps(list(CONTEXT_ROLES_VERBATIM)) + " -%}",
        "{%- set ns.input = ns.input + text(message['content']) -%}",
        "{%- else -%}",
        "{%- set ns.input = ns.input + (message['role'] | capitalize) + ': ' + text(message['content']) -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- set instruction = text(messages[-1]['content']) -%}",
        "{%- set input = ns.input -%}",
        "{{- bos_token -}}" if bos else "",
        "{%- if input -%}",
        render(template.prompt_input),
        "{%- else -%}",
        render(template.prompt_no_input),
        "{%- endif -%}",
    ]
    return "\n".join(line for line in lines if line)


def set_chat_template(tokenizer, template: PromptTemplate):
    """Makes ``template`` the tokenizer's chat template, so the saved model carries how it was trained."""
    adds_bos = tokenizer.bos_token_id is not None and \
        tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    tokenizer.chat_template = chat_template(template, adds_bos)
    return tokenizer


def instruction_header(template: PromptTemplate) -> str:
    """The line that introduces the instruction ("### Instruction:"): a model that writes it has begun a new turn."""
    before = next(literal for literal, field in _pieces(template, template.prompt_no_input) if field == "instruction")
    lines = [line.strip() for line in before.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def ollama_template(template: PromptTemplate) -> str:
    """The same mapping as an Ollama ``TEMPLATE`` (Go text/template over ``.Messages``); Ollama adds BOS itself.

    Literals are quoted strings and every action trims the whitespace around it, so only they are output.
    """

    def render(prompt: str) -> str:
        fields = {"instruction": "{{- $instruction }}", "input": "{{- $input }}"}
        return "".join(("{{- " + json.dumps(literal, ensure_ascii=False) + " }}" if literal else "")
                       + (fields[field] if field else "") for literal, field in _pieces(template, prompt))

    verbatim = " ".join(f"(eq .Role {json.dumps(role)})" for role in CONTEXT_ROLES_VERBATIM)
    named = "".join(f'\n{{{{- else if eq .Role "{role}" }}}}{{{{- $text = print "{role.capitalize()}: " .Content }}}}'
                    for role in ("user", "assistant", "tool"))
    return "\n".join([
        '{{- $instruction := "" }}{{- $input := "" }}{{- $text := "" }}',
        "{{- range $i, $message := .Messages }}",
        "{{- if eq (len (slice $.Messages $i)) 1 }}{{- $instruction = .Content }}",
        "{{- else }}",
        f"{{{{- if or {verbatim} }}}}{{{{- $text = .Content }}}}{named}",
        '{{- else }}{{- $text = print .Role ": " .Content }}',
        "{{- end }}",
        "{{- if $i }}{{- $input = print $input " + json.dumps(CONTEXT_SEPARATOR) + " $text }}"
        "{{- else }}{{- $input = $text }}{{- end }}",
        "{{- end }}",
        "{{- end }}",
        "{{- if $input }}",
        render(template.prompt_input),
        "{{- else }}",
        render(template.prompt_no_input),
        "{{- end }}",
    ])
