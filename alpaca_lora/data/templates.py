"""Prompt templates: the one place that turns an instruction (and input), or a conversation, into a prompt.

Training, generation, serving and evaluation all call :func:`get_template`, and prompt through a
:class:`Prompter` (the template, the tokenizer's special tokens, and how earlier turns are shown), so a
model is always prompted exactly as it was trained. The same template also travels with the model, as
the tokenizer's Jinja ``chat_template`` (vLLM, ``transformers serve``, llama.cpp) and as an Ollama
``TEMPLATE``, both rendering a conversation byte for byte as this project's server does.

A conversation is rendered in one of two ways (``multi_turn``), both identical for a single user turn:

- folded (a model trained on single instructions): the last user message is the instruction, every
  earlier message a paragraph of the template's input;
- turns (a model trained on conversations): the first user turn is the single-turn prompt (leading
  system messages as its input), each answer follows its ``### Response:`` and ends on the EOS token,
  and each later user turn is the template's instruction block again (``### Instruction:\n...\n\n
  ### Response:``), from the line that introduces the instruction.

``template=model`` is the base tokenizer's own chat template (instruct bases), applied as transformers
applies it.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


MODEL = "model"  # template=model: the base tokenizer's own chat template


@dataclass(frozen=True)
class ModelTemplate:
    """``template=model``: the base tokenizer's own Jinja chat template, applied as transformers applies it
    (rendered, then tokenized without adding special tokens). It needs the tokenizer: prompt through a
    :class:`Prompter`."""

    name: str = MODEL

    def format(self, instruction: str, input: str = "") -> str:
        raise TemplateError("template 'model' is the model's own chat template: it prompts through the model's "
                            "tokenizer, not here; use template=alpaca (or a template file) for this command")


class TemplateError(UserError):
    pass


class ConversationError(UserError):
    """A conversation the template cannot render; ``index`` is the message at fault (None: the whole list)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


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


def get_template(name_or_path: str) -> PromptTemplate | ModelTemplate:
    """A built-in template by name, ``model`` (the base's own chat template), or a template file by path."""
    if name_or_path in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_path]
    if name_or_path == MODEL:
        return ModelTemplate()
    if Path(name_or_path).suffix in {".json", ".yaml", ".yml"}:
        return load_template_file(name_or_path)
    raise TemplateError(
        f"unknown template '{name_or_path}': use one of {sorted(BUILTIN_TEMPLATES)}, {MODEL} (the base model's own "
        "chat template) or a .json/.yaml file"
    )


# How a conversation becomes one prompt (the module's docstring): folded, the last message, from the user, is the
# instruction and the earlier ones the input, one paragraph each, system (or developer) messages as they are and
# the others as "User: ...", "Assistant: ..."; in turns, leading system messages are the first turn's input.
CONTEXT_ROLES_VERBATIM = ("system", "developer")
CONTEXT_SEPARATOR = "\n\n"
ROLES = (*CONTEXT_ROLES_VERBATIM, "user", "assistant")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids as training and generation both use them: special tokens (BOS) but never EOS."""
    return _without_eos(tokenizer, tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _without_eos(tokenizer, ids: list[int]) -> list[int]:
    if ids and ids[-1] == tokenizer.eos_token_id and ids[-1] != tokenizer.bos_token_id:
        return ids[:-1]
    return ids


def record_message(instruction: str, input: str = "") -> str:
    """An Alpaca record's instruction and input as one user message (for a chat template): two paragraphs."""
    return f"{instruction}{CONTEXT_SEPARATOR}{input}" if input else instruction


def turn_order_problem(roles: list[str], last: tuple[str, ...] = ("user",)) -> tuple[int, str] | None:
    """Where a conversation breaks the order of turns, and why, or None: system (or developer) messages only
    before the first user turn, then user and assistant turns in turn, starting with user, ending with ``last``."""
    expected, started = "user", False
    for index, role in enumerate(roles):
        if role not in ROLES:
            return index, f"unknown role '{role}' ({', '.join(ROLES)})"
        if role in CONTEXT_ROLES_VERBATIM:
            if started:
                return index, f"a {role} message may only come at the start of a conversation, before any turn"
            continue
        if role != expected:
            if not started:
                return index, "a conversation starts with a user turn (after any system message), not an assistant turn"
            return index, f"two {role} turns in a row"
        started, expected = True, ("assistant" if role == "user" else "user")
    if not started:
        return max(len(roles) - 1, 0), "a conversation needs a user turn"
    if roles[-1] not in last:
        wanted = " or ".join(f"{'an' if role == 'assistant' else 'a'} {role}" for role in last)
        return len(roles) - 1, f"the conversation must end with {wanted} turn, not a {roles[-1]} one"
    return None


def turn_prompt(template: PromptTemplate) -> str:
    """The format string of a later user turn: ``prompt_no_input`` from the line that introduces the instruction
    (Alpaca: ``### Instruction:\n{instruction}\n\n### Response:``); the preamble is said once, in the first turn."""
    pieces = _pieces(template, template.prompt_no_input)
    first = next(i for i, (_, field) in enumerate(pieces) if field == "instruction")
    literal = pieces[first][0]
    pieces[first] = (literal[literal.rstrip().rfind("\n") + 1:], "instruction")

    def escaped(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    return "".join(escaped(literal) + (f"{{{field}}}" if field else "") for literal, field in pieces[first:])


def conversation_prompt(template: PromptTemplate, messages: list[dict], eos_token: str, multi_turn: bool) -> str:
    """The text of a conversation (``role``/``content`` messages, text content) as ``template`` renders it, folded
    or in turns (the module's docstring). A conversation that ends with the user's message renders as the prompt
    the answer follows; in turns, one that ends with an answer renders whole, every answer followed by
    ``eos_token``. The tokenizer adds BOS (:func:`encode_prompt`); the chat templates write it as ``bos_token``."""
    if not multi_turn:
        *earlier, last = messages
        if last["role"] != "user":
            raise ConversationError("the last message must have role 'user'", len(messages) - 1)
        context = [message["content"] if message["role"] in CONTEXT_ROLES_VERBATIM else
                   f"{message['role'].capitalize()}: {message['content']}" for message in earlier]
        return template.format(last["content"], CONTEXT_SEPARATOR.join(context))
    problem = turn_order_problem([message["role"] for message in messages], last=("user", "assistant"))
    if problem:
        raise ConversationError(problem[1], problem[0])
    system = CONTEXT_SEPARATOR.join(m["content"] for m in messages if m["role"] in CONTEXT_ROLES_VERBATIM)
    later, parts = turn_prompt(template), []
    for message in messages:
        if message["role"] == "user":
            parts.append(later.format(instruction=message["content"]) if parts else
                         template.format(message["content"], system))
        elif message["role"] == "assistant":
            parts.append(message["content"] + eos_token)
    return "".join(parts)


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


def _jinja(template: PromptTemplate, prompt: str) -> str:
    """A format string as one Jinja output tag over the variables ``instruction`` and ``input``."""
    parts = []
    for literal, field in _pieces(template, prompt):
        if literal:
            parts.append(json.dumps(literal, ensure_ascii=False))
        if field:
            parts.append(field)
    return "{{- " + " + ".join(parts) + " -}}"


_JINJA_TEXT = [
    "{%- macro text(content) -%}",
    "{%- if content is string -%}{{- content -}}{%- else -%}{%- for part in content -%}{{- part['text'] -}}"
    "{%- endfor -%}{%- endif -%}",
    "{%- endmacro -%}",
]


def chat_template(template: PromptTemplate, bos: bool, multi_turn: bool = False) -> str:
    """A Jinja ``chat_template`` rendering a conversation as the server prompts it (folded, or in turns).

    With ``bos`` (the tokenizer adds BOS to a prompt itself) it starts with ``bos_token``: chat
    consumers tokenize the rendered text without special tokens (transformers, vLLM) or drop a
    leading BOS they add themselves (llama.cpp), so the ids are the training prompt's either way.
    Every literal is a quoted string and every tag trims whitespace, so no Jinja whitespace rule
    can add or drop a byte.
    """
    if multi_turn:
        return _chat_template_in_turns(template, bos)
    lines = [
        "{#- alpaca-lora: the '" + template.name + "' prompt template the model was trained with -#}",
        *_JINJA_TEXT,
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
        _jinja(template, template.prompt_input),
        "{%- else -%}",
        _jinja(template, template.prompt_no_input),
        "{%- endif -%}",
    ]
    return "\n".join(line for line in lines if line)


def _chat_template_in_turns(template: PromptTemplate, bos: bool) -> str:
    """The Jinja of :func:`conversation_prompt` in turns: the same checks (``raise_exception``), the same bytes."""
    lines = [
        "{#- alpaca-lora: the '" + template.name + "' prompt template the model was trained with, in turns -#}",
        *_JINJA_TEXT,
        "{%- set ns = namespace(input='', systems=0, turns=0, expected='user') -%}",
        "{%- for message in messages -%}",
        "{%- if message['role'] in " + json.dumps(list(CONTEXT_ROLES_VERBATIM)) + " -%}",
        "{%- if ns.turns > 0 -%}{{- raise_exception(\"a system message may only come at the start of a "
        "conversation\") -}}{%- endif -%}",
        "{%- if ns.systems > 0 -%}{%- set ns.input = ns.input + " + json.dumps(CONTEXT_SEPARATOR) + " -%}{%- endif -%}",
        "{%- set ns.input = ns.input + text(message['content']) -%}",
        "{%- set ns.systems = ns.systems + 1 -%}",
        "{%- elif message['role'] != ns.expected -%}",
        "{{- raise_exception(\"user and assistant turns must alternate, starting with user\") -}}",
        "{%- elif message['role'] == 'user' -%}",
        "{%- set instruction = text(message['content']) -%}",
        "{%- if ns.turns == 0 -%}",
        "{{- bos_token -}}" if bos else "",
        "{%- set input = ns.input -%}",
        "{%- if input -%}" + _jinja(template, template.prompt_input) + "{%- else -%}"
        + _jinja(template, template.prompt_no_input) + "{%- endif -%}",
        "{%- else -%}",
        _jinja(template, turn_prompt(template)),
        "{%- endif -%}",
        "{%- set ns.turns = ns.turns + 1 -%}",
        "{%- set ns.expected = 'assistant' -%}",
        "{%- else -%}",
        "{{- text(message['content']) + eos_token -}}",
        "{%- set ns.expected = 'user' -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if ns.turns == 0 -%}{{- raise_exception(\"a conversation needs a user message\") -}}{%- endif -%}",
    ]
    return "\n".join(line for line in lines if line)


def set_chat_template(tokenizer, template: PromptTemplate | ModelTemplate, multi_turn: bool = False):
    """Makes ``template`` the tokenizer's chat template, so the saved model carries how it was trained. With
    ``template=model`` the tokenizer keeps its own, and must have one."""
    if isinstance(template, ModelTemplate):
        if not tokenizer.chat_template:
            raise TemplateError(f"key 'template': template=model uses the base model's own chat template, and "
                                f"{tokenizer.name_or_path}'s tokenizer has none; use template=alpaca (or a template "
                                "file)")
        return tokenizer
    adds_bos = tokenizer.bos_token_id is not None and \
        tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    tokenizer.chat_template = chat_template(template, adds_bos, multi_turn)
    return tokenizer


def instruction_header(template: PromptTemplate | ModelTemplate) -> str:
    """The line that introduces the instruction ("### Instruction:"): a model that writes it has begun a new turn."""
    if isinstance(template, ModelTemplate):
        return ""
    before = next(literal for literal, field in _pieces(template, template.prompt_no_input) if field == "instruction")
    lines = [line.strip() for line in before.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _go(template: PromptTemplate, prompt: str) -> str:
    """A format string as Go template actions over the variables ``$instruction`` and ``$input``."""
    fields = {"instruction": "{{- $instruction }}", "input": "{{- $input }}"}
    return "".join(("{{- " + json.dumps(literal, ensure_ascii=False) + " }}" if literal else "")
                   + (fields[field] if field else "") for literal, field in _pieces(template, prompt))


def ollama_template(template: PromptTemplate, multi_turn: bool = False, eos_token: str = "") -> str:
    """The same mapping as an Ollama ``TEMPLATE`` (Go text/template over ``.Messages``); Ollama adds BOS itself.
    In turns, every answer is followed by ``eos_token``'s text, which Ollama's tokenizer reads as the EOS token.

    Literals are quoted strings and every action trims the whitespace around it, so only they are output.
    """
    if multi_turn:
        return _ollama_template_in_turns(template, eos_token)
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
        _go(template, template.prompt_input),
        "{{- else }}",
        _go(template, template.prompt_no_input),
        "{{- end }}",
    ])


def _ollama_template_in_turns(template: PromptTemplate, eos_token: str) -> str:
    verbatim = " ".join(f"(eq .Role {json.dumps(role)})" for role in CONTEXT_ROLES_VERBATIM)
    return "\n".join([
        '{{- $input := "" }}{{- $systems := 0 }}{{- $turns := 0 }}',
        "{{- range .Messages }}",
        f"{{{{- if or {verbatim} }}}}",
        "{{- if $systems }}{{- $input = print $input " + json.dumps(CONTEXT_SEPARATOR) + " .Content }}"
        "{{- else }}{{- $input = .Content }}{{- end }}{{- $systems = 1 }}",
        '{{- else if eq .Role "user" }}{{- $instruction := .Content }}',
        "{{- if $turns }}" + _go(template, turn_prompt(template)),
        "{{- else if $input }}" + _go(template, template.prompt_input),
        "{{- else }}" + _go(template, template.prompt_no_input),
        "{{- end }}{{- $turns = 1 }}",
        '{{- else if eq .Role "assistant" }}{{- .Content }}{{- ' + json.dumps(eos_token, ensure_ascii=False) + " }}",
        "{{- end }}",
        "{{- end }}",
    ])


@dataclass(frozen=True)
class Prompter:
    """How one model is prompted: its template, its tokenizer, and how earlier turns are shown (``multi_turn``:
    as turns, for a model trained on conversations; else folded into the template's input). Training,
    generation, the server, the app and evaluation all prompt through one, so they agree byte for byte."""

    template: PromptTemplate | ModelTemplate
    tokenizer: Any
    multi_turn: bool = False

    @property
    def own_template(self) -> bool:
        """``template=model``: the tokenizer's own chat template renders, as transformers applies it."""
        return isinstance(self.template, ModelTemplate)

    def prompt(self, messages: list[dict]) -> str:
        """The prompt text of a conversation that ends with the user's message: the text the answer follows.
        Raises :class:`ConversationError` (naming the message at fault) for one the template cannot render."""
        if not messages or messages[-1]["role"] != "user":
            raise ConversationError("the last message must have role 'user'", len(messages) - 1 if messages else None)
        if self.own_template:
            return self.render(messages, add_generation_prompt=True)
        eos = (self.tokenizer.eos_token or "") if self.multi_turn else ""  # only answers in the history end on it
        return conversation_prompt(self.template, messages, eos, self.multi_turn)

    def instruction(self, instruction: str, input: str = "") -> str:
        """The prompt of one Alpaca record: the template's own text (template=model: one user message)."""
        if self.own_template:
            return self.prompt([{"role": "user", "content": record_message(instruction, input)}])
        return self.template.format(instruction, input)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """template=model: the conversation through the tokenizer's chat template (an answer last renders whole)."""
        from jinja2.exceptions import TemplateError as JinjaError

        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except JinjaError as exc:
            raise ConversationError(f"the model's chat template refused the conversation: {exc}") from None

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids as generation feeds them: with BOS, never EOS (:func:`encode_prompt`); template=model as
        transformers' ``apply_chat_template`` tokenizes (the template writes its own special tokens)."""
        return self.encode_all([prompt])[0]

    def encode_all(self, prompts: list[str]) -> list[list[int]]:
        """:meth:`encode` of many prompts in one call of the tokenizer (its batches run in parallel)."""
        if not prompts:
            return []
        ids = self.tokenizer(prompts, add_special_tokens=not self.own_template)["input_ids"]
        return ids if self.own_template else [_without_eos(self.tokenizer, one) for one in ids]
