"""Byte-exact regression of the built-in prompt templates, and user template files."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from alpaca_lora.common.errors import UserError
from alpaca_lora.data.templates import (
    BUILTIN_TEMPLATES,
    PromptTemplate,
    TemplateError,
    get_template,
    load_template_file,
)

# Stanford Alpaca's train.py PROMPT_DICT, written out here independently of the package.
STANFORD_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
STANFORD_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

INSTRUCTION = "Name the capital of the country."
INPUT = "Zorblax"

# sha256 of the formatted prompts for (INSTRUCTION, INPUT) and (INSTRUCTION, ""), computed once from
# the literals above: a second, independent pin of every byte.
SHA256 = {
    ("alpaca", True): "a88a77a741e5ab8db01c641a87867fa2cbb94aabcfdd58bd3618a985724ec665",
    ("alpaca", False): "3984d5ecac7e672f95904d52cc3b85f90c4bd55a256a36e28302b864a7f1844e",
    ("alpaca_lora", True): "30080d5027818b71e732f7651e606c58c265c5c331f1996c2a830d3177a089ac",
    ("alpaca_lora", False): "7ba8ece284f939403534c10cc4225040ea64404dce845bf82f7aebb23b5c1ff2",
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_builtin_names():
    assert set(BUILTIN_TEMPLATES) == {"alpaca", "alpaca_lora"}
    assert get_template("alpaca") is BUILTIN_TEMPLATES["alpaca"]
    assert get_template("alpaca_lora") is BUILTIN_TEMPLATES["alpaca_lora"]


def test_alpaca_template_is_stanford_byte_for_byte():
    template = get_template("alpaca")
    assert template.prompt_input == STANFORD_PROMPT_INPUT
    assert template.prompt_no_input == STANFORD_PROMPT_NO_INPUT
    assert template.response_split == "### Response:"


def test_alpaca_lora_template_adds_one_newline():
    template = get_template("alpaca_lora")
    assert template.prompt_input == STANFORD_PROMPT_INPUT + "\n"
    assert template.prompt_no_input == STANFORD_PROMPT_NO_INPUT + "\n"
    assert template.response_split == "### Response:"


@pytest.mark.parametrize("name", ["alpaca", "alpaca_lora"])
def test_formatted_prompts_exact(name):
    template = get_template(name)
    suffix = "\n" if name == "alpaca_lora" else ""
    with_input = template.format(INSTRUCTION, INPUT)
    without_input = template.format(INSTRUCTION)
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName the capital of the country.\n\n### Input:\nZorblax\n\n### Response:" + suffix
    )
    assert without_input == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName the capital of the country.\n\n### Response:" + suffix
    )
    assert _sha(with_input) == SHA256[(name, True)]
    assert _sha(without_input) == SHA256[(name, False)]


@pytest.mark.parametrize("name", ["alpaca", "alpaca_lora"])
def test_empty_input_picks_no_input_variant(name):
    template = get_template(name)
    expected = template.prompt_no_input.format(instruction=INSTRUCTION)
    assert template.format(INSTRUCTION, "") == expected
    assert template.format(INSTRUCTION) == expected
    assert "### Input:" not in template.format(INSTRUCTION, "")
    assert "### Input:\nx\n" in template.format(INSTRUCTION, "x")


def test_braces_in_user_text_are_not_reformatted():
    # The instruction/input are data: braces in them must come through literally.
    prompt = get_template("alpaca").format("Fill {input} and {0}", "{instruction}")
    assert "### Instruction:\nFill {input} and {0}\n\n### Input:\n{instruction}\n\n" in prompt


def test_response_from():
    template = get_template("alpaca")
    text = template.format(INSTRUCTION, INPUT) + " Quibbletown. "
    assert template.response_from(text) == "Quibbletown."


# --- user template files -------------------------------------------------------------------------

ALPACA_LORA_JSON = {
    # the shape of tloen/alpaca-lora templates/alpaca.json
    "description": "Template used by Alpaca-LoRA.",
    "prompt_input": STANFORD_PROMPT_INPUT + "\n",
    "prompt_no_input": STANFORD_PROMPT_NO_INPUT + "\n",
    "response_split": "### Response:",
}


def test_user_template_from_json(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA_LORA_JSON), encoding="utf-8")
    template = get_template(str(path))
    assert isinstance(template, PromptTemplate)
    assert template.name == "alpaca"
    assert template.prompt_input == ALPACA_LORA_JSON["prompt_input"]
    assert template.prompt_no_input == ALPACA_LORA_JSON["prompt_no_input"]
    assert template.response_split == "### Response:"
    # An alpaca-lora template file prompts exactly like the built-in alpaca_lora template.
    builtin = get_template("alpaca_lora")
    assert template.format(INSTRUCTION, INPUT) == builtin.format(INSTRUCTION, INPUT)
    assert template.format(INSTRUCTION) == builtin.format(INSTRUCTION)


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_user_template_from_yaml(tmp_path, suffix):
    path = tmp_path / f"short{suffix}"
    path.write_text(
        "description: a short one\n"
        "prompt_input: \"Q: {instruction}\\nContext: {input}\\nA:\"\n"
        "prompt_no_input: \"Q: {instruction}\\nA:\"\n"
        "response_split: \"A:\"\n",
        encoding="utf-8",
    )
    template = get_template(str(path))
    assert template.name == "short"
    assert template.format("2+2?", "math") == "Q: 2+2?\nContext: math\nA:"
    assert template.format("2+2?") == "Q: 2+2?\nA:"
    assert template.response_split == "A:"
    assert template.response_from("Q: 2+2?\nA: 4") == "4"


def test_user_template_response_split_defaults(tmp_path):
    path = tmp_path / "nosplit.json"
    path.write_text(json.dumps({"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}"}))
    assert load_template_file(path).response_split == "### Response:"


def _assert_one_line_error(exc_info, *needles):
    message = str(exc_info.value)
    assert isinstance(exc_info.value, UserError)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"prompt_no_input": "{instruction}"}, "prompt_input"),
        ({"prompt_input": "{instruction} {input}"}, "prompt_no_input"),
        ({"prompt_input": 3, "prompt_no_input": "{instruction}"}, "prompt_input"),
        ({"prompt_input": "{input} only", "prompt_no_input": "{instruction}"}, "prompt_input"),
        ({"prompt_input": "{instruction} only", "prompt_no_input": "{instruction}"}, "prompt_input"),
        ({"prompt_input": "{instruction} {input}", "prompt_no_input": "no placeholder"}, "prompt_no_input"),
    ],
    ids=["missing-prompt_input", "missing-prompt_no_input", "not-a-string", "input-lacks-instruction",
         "input-lacks-input", "no_input-lacks-instruction"],
)
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_bad_template_file(tmp_path, spec, field, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_text(json.dumps(spec), encoding="utf-8")  # JSON is valid YAML too
    with pytest.raises(TemplateError) as exc_info:
        get_template(str(path))
    _assert_one_line_error(exc_info, str(path), f"'{field}'")


def test_template_file_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(TemplateError) as exc_info:
        get_template(str(path))
    _assert_one_line_error(exc_info, str(path), "prompt_input")


@pytest.mark.parametrize("name, text", [("broken.json", '{"prompt_input": '), ("broken.yaml", "a: [1,\nb: :\n")])
def test_template_file_unparseable(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TemplateError) as exc_info:
        get_template(str(path))
    _assert_one_line_error(exc_info, str(path))


def test_template_file_missing(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(TemplateError) as exc_info:
        get_template(str(path))
    _assert_one_line_error(exc_info, str(path))


@pytest.mark.parametrize("name", ["vicuna", "Alpaca", "alpaca.txt", ""])
def test_unknown_template_name(name):
    with pytest.raises(TemplateError) as exc_info:
        get_template(name)
    _assert_one_line_error(exc_info, f"'{name}'", "alpaca", "alpaca_lora")


# --- the template as the model's chat template ---------------------------------------------------

# A user template with everything that could trip a Jinja or Go rendering: quotes, backslashes, braces
# (escaped for str.format), Jinja-looking text, non-ASCII, tabs, a leading newline and trailing spaces.
ODD_TEMPLATE = {
    "prompt_input": "\n<<SYS>> \"quoted\" \\ {{braces}} {{% raw %}} {{{{ x }}}}\t✓\n{instruction}\n[ctx] {input}\nA: ",
    "prompt_no_input": "\n<<SYS>> 'single' {{# not a comment #}}\n{instruction}\nA:  ",
}

CONVERSATIONS = {
    "user": [("user", "Name the capital of Zorblax.")],
    "system": [("system", "Answer in one word."), ("user", "Name the capital of Zorblax.")],
    "developer-and-turns": [("developer", "Be brief."), ("user", "Hi"), ("assistant", "Hello! {{ not jinja }}"),
                            ("user", "What is 2+2?")],
    "content-parts": [("system", [{"type": "text", "text": "Part one, "}, {"type": "text", "text": "part two."}]),
                      ("user", [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}])],
    "empty-system": [("system", ""), ("user", "Hi")],
}


def _template(name, tmp_path):
    if name != "user-file":
        return get_template(name)
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(ODD_TEMPLATE), encoding="utf-8")
    return get_template(str(path))


def _server_prompt(tokenizer, template, conversation, multi_turn=False):
    """What this project's server (alpaca_lora.serve.chat_prompt) prompts the model with."""
    from alpaca_lora.inference.loading import LoadedModel
    from alpaca_lora.serve.server import ChatMessage, chat_prompt

    loaded = LoadedModel(None, tokenizer, template, "m", "m", multi_turn=multi_turn)
    return chat_prompt(loaded, [ChatMessage(role=role, content=content) for role, content in conversation])


@pytest.fixture(scope="module", params=["tiny", "demo"])
def chat_tokenizer(request, tiny_model_dir):
    """The tiny test tokenizer (it adds BOS) and the demo model's SmolLM2 tokenizer (it does not)."""
    from alpaca_lora.model import load_tokenizer

    directory = tiny_model_dir if request.param == "tiny" else request.getfixturevalue("demo_model_dir")
    return request.param, load_tokenizer(str(directory))


@pytest.mark.parametrize("conversation", list(CONVERSATIONS), ids=list(CONVERSATIONS))
@pytest.mark.parametrize("name", ["alpaca", "alpaca_lora", "user-file"])
def test_chat_template_renders_the_training_prompt_byte_for_byte(chat_tokenizer, name, conversation, tmp_path):
    from alpaca_lora.data.examples import encode_prompt
    from alpaca_lora.data.templates import set_chat_template

    (kind, tokenizer), template = chat_tokenizer, _template(name, tmp_path)
    set_chat_template(tokenizer, template)
    messages = [{"role": role, "content": content} for role, content in CONVERSATIONS[conversation]]
    prompt = _server_prompt(tokenizer, template, CONVERSATIONS[conversation])
    if conversation == "user":
        assert prompt == template.format(CONVERSATIONS["user"][0][1])
    training_ids = encode_prompt(tokenizer, prompt)  # the ids training and the server feed the model
    adds_bos = training_ids[0] == tokenizer.bos_token_id
    assert adds_bos == (kind == "tiny")

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # chat consumers tokenize the rendered text without adding special tokens: the BOS the tokenizer
    # would add itself is in the text, once, and nothing else differs by a byte
    assert text == (tokenizer.bos_token if adds_bos else "") + prompt
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == training_ids
    assert tokenizer.eos_token_id not in ids


def test_the_chat_template_is_saved_with_the_tokenizer_and_refuses_a_last_non_user_message(tiny_tokenizer,
                                                                                           tmp_path):
    from jinja2.exceptions import TemplateError as JinjaTemplateError
    from transformers import AutoTokenizer

    from alpaca_lora.data.templates import chat_template, set_chat_template

    set_chat_template(tiny_tokenizer, get_template("alpaca"))
    assert tiny_tokenizer.chat_template == chat_template(get_template("alpaca"), bos=True)
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == reloaded.chat_template == tiny_tokenizer.chat_template
    with pytest.raises(JinjaTemplateError, match="the last message must have role 'user'"):
        reloaded.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                     tokenize=False)


def test_a_template_with_other_fields_cannot_become_a_chat_template(tmp_path):
    from alpaca_lora.data.templates import chat_template

    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"prompt_input": "{instruction} {input} {date}", "prompt_no_input": "{instruction}"}))
    with pytest.raises(TemplateError) as exc_info:
        chat_template(get_template(str(path)), bos=False)
    _assert_one_line_error(exc_info, "'odd'", "{date}")


def test_instruction_header_is_the_line_before_the_instruction(tmp_path):
    from alpaca_lora.data.templates import instruction_header

    assert instruction_header(get_template("alpaca")) == "### Instruction:"
    assert instruction_header(get_template("alpaca_lora")) == "### Instruction:"
    assert instruction_header(_template("user-file", tmp_path)) == "<<SYS>> 'single' {# not a comment #}"




def test_the_ollama_template_renders_the_server_prompt_in_go(tmp_path, go_templates):
    """Ollama executes TEMPLATE with Go's text/template over .Messages (Role, Content): the same engine here."""
    from alpaca_lora.data.templates import ollama_template

    cases, expected = [], []
    for name in ["alpaca", "alpaca_lora", "user-file"]:
        template = _template(name, tmp_path)
        for conversation in CONVERSATIONS.values():
            if any(not isinstance(content, str) for _, content in conversation):
                continue  # Ollama's messages carry text only
            cases.append((ollama_template(template), [{"Role": role, "Content": content}
                                                      for role, content in conversation]))
            expected.append(_server_prompt(None, template, conversation))
    assert go_templates(cases) == expected


# --- a model trained on conversations: the template in turns -------------------------------------------------

PARTS = [{"type": "text", "text": "Part one, "}, {"type": "text", "text": "part two."}]
TURNS = {
    "user": [("user", "Name the capital of Zorblax.")],
    "system": [("system", "Answer in one word."), ("user", "Name the capital of Zorblax.")],
    "three-turns": [("system", "Answer in one word."), ("user", "Name the capital of Zorblax."),
                    ("assistant", "Quibbletown. {{ not jinja }} {% raw %}"), ("user", "And what river runs there?"),
                    ("assistant", 'Silver, "quoted" \\ {braces}\t✓'), ("user", "Spell the river backwards.")],
    "no-system": [("user", "Hi"), ("assistant", "Hello!\n\nHow can I help?"), ("user", "What is 2+2?")],
    "two-systems": [("system", ""), ("developer", "Be brief."), ("user", "Hi"), ("assistant", "Hello"),
                    ("user", "Bye")],
    "content-parts": [("system", PARTS), ("user", PARTS), ("assistant", PARTS), ("user", "Again.")],
}


def _text(content):
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


@pytest.mark.parametrize("conversation", list(TURNS), ids=list(TURNS))
@pytest.mark.parametrize("name", ["alpaca", "alpaca_lora", "user-file"])
def test_chat_template_in_turns_renders_training_and_the_server_byte_for_byte(chat_tokenizer, name, conversation,
                                                                               tmp_path):
    """The prompt of every turn: the ids training learned the answer after (the example's prefix), the server's
    prompt, and transformers' apply_chat_template of the saved chat template are one."""
    from alpaca_lora.data.examples import tokenize_records
    from alpaca_lora.data.templates import encode_prompt, set_chat_template

    (kind, tokenizer), template = chat_tokenizer, _template(name, tmp_path)
    set_chat_template(tokenizer, template, multi_turn=True)
    turns = TURNS[conversation]
    messages = [{"role": role, "content": content} for role, content in turns]
    prompt = _server_prompt(tokenizer, template, turns, multi_turn=True)
    if len(turns) <= 2:  # one user turn: the single-turn prompt, as folded
        assert prompt == _server_prompt(tokenizer, template, turns)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (tokenizer.bos_token if kind == "tiny" else "") + prompt
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == encode_prompt(tokenizer, prompt)

    answered = [{"role": role if role != "developer" else "system", "content": _text(content)} for role, content in
                turns] + [{"role": "assistant", "content": "The answer."}]
    dataset, stats = tokenize_records([{"messages": answered}], template, tokenizer, 4096, multi_turn=True)
    example, mask = dataset[-1]["input_ids"], dataset[-1]["completion_mask"]
    answer = tokenizer("The answer.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example == ids + answer and mask[len(ids):] == [1] * len(answer)  # learned right where the server stops
    # The odd user template ends with spaces, which the byte-level tokenizers join to a following word: there an
    # answer's history re-tokenizes differently, and the turn after it is an example of its own. Not with ours.
    if name != "user-file":
        assert len(dataset) == 1 and stats["restarted"] == 0
        whole = tokenizer.apply_chat_template(answered, tokenize=True, return_dict=False)
        assert whole == example  # the whole conversation through the chat template is the training example


@pytest.mark.parametrize("turns, reason", [
    ([("user", "a"), ("user", "b")], "alternate"), ([("assistant", "a"), ("user", "b")], "alternate"),
    ([("user", "a"), ("assistant", "b"), ("system", "c"), ("user", "d")], "start of a conversation"),
    ([("system", "a")], "needs a user message")], ids=["two-users", "answer-first", "late-system", "system-only"])
def test_the_chat_template_in_turns_refuses_what_the_server_refuses(tiny_tokenizer, turns, reason):
    from jinja2.exceptions import TemplateError as JinjaTemplateError

    from alpaca_lora.data.templates import ConversationError, Prompter, set_chat_template

    tokenizer = set_chat_template(copy.deepcopy(tiny_tokenizer), get_template("alpaca"), multi_turn=True)
    messages = [{"role": role, "content": content} for role, content in turns]
    with pytest.raises(JinjaTemplateError, match=reason):
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with pytest.raises(ConversationError):
        Prompter(get_template("alpaca"), tokenizer, multi_turn=True).prompt(messages)


def test_the_ollama_template_in_turns_renders_the_server_prompt_in_go(tmp_path, go_templates):
    """The Modelfile's TEMPLATE of a model trained on conversations, executed by Go's text/template as Ollama
    executes it: the server's prompt, byte for byte, every answer followed by the EOS token's text."""
    from types import SimpleNamespace

    from alpaca_lora.data.templates import ollama_template

    cases, expected = [], []
    for name, eos in [("alpaca", "</s>"), ("alpaca_lora", "<|im_end|>"), ("user-file", "</s>")]:
        template = _template(name, tmp_path)
        for turns in TURNS.values():
            if any(not isinstance(content, str) for _, content in turns):
                continue  # Ollama's messages carry text only
            cases.append((ollama_template(template, multi_turn=True, eos_token=eos),
                          [{"Role": role, "Content": content} for role, content in turns]))
            expected.append(_server_prompt(SimpleNamespace(eos_token=eos), template, turns, multi_turn=True))
    assert go_templates(cases) == expected
    assert any("Silver" in prompt and "</s>### Instruction:" in prompt for prompt in expected)  # turns, not folded
