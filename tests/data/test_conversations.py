"""Conversations: OpenAI ``messages`` and ShareGPT ``conversations`` read and validated (every bad case one line),
rendered in turns, and tokenized with the loss on every answer and nothing else, each boundary the one generation
sees."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from alpaca_lora.common.errors import DataError, UserError
from alpaca_lora.data.examples import tokenize_records
from alpaca_lora.data.loading import load_records
from alpaca_lora.data.templates import ConversationError, Prompter, conversation_prompt, encode_prompt, get_template

TEMPLATE = get_template("alpaca")
BOS, EOS = 1, 2

MESSAGES = [
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "Name the capital of Zorblax."},
                  {"role": "assistant", "content": "Quibbletown."},
                  {"role": "user", "content": "And what river runs through it?"},
                  {"role": "assistant", "content": "Silver."},
                  {"role": "user", "content": "Spell the river backwards."},
                  {"role": "assistant", "content": "revliS"}]},
    {"messages": [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42"}]},
]
SHAREGPT = [
    {"id": "a", "conversations": [{"from": "system", "value": "Answer in one word."},
                                  {"from": "human", "value": "Name the capital of Zorblax."},
                                  {"from": "gpt", "value": "Quibbletown."},
                                  {"from": "human", "value": "And what river runs through it?"},
                                  {"from": "gpt", "value": "Silver."},
                                  {"from": "human", "value": "Spell the river backwards."},
                                  {"from": "gpt", "value": "revliS"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "What is 12 plus 30?"}, {"from": "gpt", "value": "42"}]},
]
ALPACA = {"instruction": "What is 12 plus 30?", "input": "", "output": "42"}


def _write(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _assert_one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert isinstance(exc_info.value, UserError)
    assert message and "\n" not in message, repr(message)
    for needle in needles:
        assert needle in message, (needle, message)


# --- reading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("records, kind", [(MESSAGES, "messages"), (SHAREGPT, "sharegpt")], ids=["openai", "sharegpt"])
def test_each_format_reads_as_openai_messages(tmp_path, records, kind, suffix):
    data = load_records(str(_write(tmp_path / f"data{suffix}", records + records[:1])), conversations=True)
    assert data.format == kind and data.conversations
    assert data.records == MESSAGES  # ShareGPT's roles become OpenAI's; other fields (its id) are left out
    assert data.duplicates_dropped == 1


def test_content_parts_and_weights_are_kept(tmp_path):
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]
    record = {"messages": [{"role": "user", "content": parts},
                           {"role": "assistant", "content": "Hi.", "weight": 0},
                           {"role": "user", "content": "Again."}, {"role": "assistant", "content": "Hi!", "weight": 1}]}
    data = load_records(str(_write(tmp_path / "data.json", [record])), conversations=True)
    assert data.records[0]["messages"] == [{"role": "user", "content": "Say hi"},
                                           {"role": "assistant", "content": "Hi.", "weight": 0},
                                           {"role": "user", "content": "Again."},
                                           {"role": "assistant", "content": "Hi!", "weight": 1}]


def test_alpaca_records_are_unchanged(tmp_path):
    data = load_records(str(_write(tmp_path / "data.json", [ALPACA])), conversations=True)
    assert data.format == "alpaca" and data.records == [ALPACA]


def test_commands_that_take_alpaca_records_refuse_conversations(tmp_path):
    path = _write(tmp_path / "chats.jsonl", MESSAGES)
    with pytest.raises(DataError) as exc_info:
        load_records(str(path), need_output=False)
    _assert_one_line(exc_info, str(path), "line 1", "OpenAI 'messages'", "only training")


def test_columns_cannot_map_a_conversation(tmp_path):
    path = _write(tmp_path / "chats.json", MESSAGES)
    with pytest.raises(DataError) as exc_info:
        load_records(str(path), columns={"output": "response"}, conversations=True)
    _assert_one_line(exc_info, str(path), "record [0]", "columns.output=response")


@pytest.mark.parametrize("first, other, named", [
    (MESSAGES, SHAREGPT[1], "ShareGPT"), (MESSAGES, ALPACA, "Alpaca"), ([ALPACA], MESSAGES[1], "OpenAI"),
    (SHAREGPT, MESSAGES[0], "OpenAI")], ids=["messages+sharegpt", "messages+alpaca", "alpaca+messages",
                                             "sharegpt+messages"])
def test_a_file_mixing_formats_names_the_first_record_of_the_other_kind(tmp_path, first, other, named):
    path = _write(tmp_path / "mixed.jsonl", first + [other, other])
    with pytest.raises(DataError) as exc_info:
        load_records(str(path), conversations=True)
    _assert_one_line(exc_info, str(path), f"line {len(first) + 1}:", named, "line 1", "one format per file")


def _messages(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# Each case: the bad record (the second of the file), the turn and field named, and a fragment of the reason.
BAD_CONVERSATIONS = [
    pytest.param({"messages": []}, "field 'messages'", "found an empty list", id="no-turns"),
    pytest.param({"messages": "hello"}, "field 'messages'", "found a string", id="not-a-list"),
    pytest.param({"messages": [["user", "hi"]]}, "messages[0]", "found a list", id="turn-not-an-object"),
    pytest.param({"messages": [{"content": "hi"}]}, "messages[0]: field 'role'", "missing", id="no-role"),
    pytest.param(_messages(("user", "hi"), ("bot", "hello")), "messages[1]: field 'role'", "unknown role 'bot'",
                 id="unknown-role"),
    pytest.param(_messages(("user", "hi"), ("tool", "{}")), "messages[1]: field 'role'", "unknown role 'tool'",
                 id="tool-role"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
                 "messages[1]: field 'content'", "missing", id="no-content"),
    pytest.param({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
                 "messages[0]: field 'content'", "found a number", id="content-number"),
    pytest.param(_messages(("user", "hi"), ("assistant", " \n ")), "messages[1]: field 'content'", "empty",
                 id="empty-answer"),
    pytest.param(_messages(("system", ""), ("user", "hi"), ("assistant", "a")), "messages[0]: field 'content'",
                 "empty", id="empty-system"),
    pytest.param(_messages(("user", "hi"), ("assistant", "a"), ("assistant", "b")), "messages[2]",
                 "two assistant turns in a row", id="two-assistant-turns"),
    pytest.param(_messages(("user", "hi"), ("user", "again"), ("assistant", "b")), "messages[1]",
                 "two user turns in a row", id="two-user-turns"),
    pytest.param(_messages(("assistant", "Hello!"), ("user", "hi"), ("assistant", "a")), "messages[0]",
                 "starts with a user turn", id="starts-with-an-answer"),
    pytest.param(_messages(("user", "hi"), ("assistant", "a"), ("user", "bye")), "messages[2]",
                 "must end with an assistant turn", id="ends-with-a-question"),
    pytest.param(_messages(("user", "hi"), ("assistant", "a"), ("system", "Be brief."), ("user", "b"),
                           ("assistant", "c")), "messages[2]", "only come at the start", id="system-in-the-middle"),
    pytest.param(_messages(("system", "Be brief.")), "messages[0]", "needs a user turn", id="system-only"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "weight": 2}]},
                 "messages[1]: field 'weight'", "0 or 1", id="weight-two"),
    pytest.param({"messages": [{"role": "user", "content": "hi", "weight": 0}, {"role": "assistant", "content": "a"}]},
                 "messages[0]: field 'weight'", "assistant turn", id="weight-on-a-question"),
    pytest.param({"messages": "x", "instruction": "a", "output": "b"}, "field 'messages'", "list", id="messages-wins"),
]


@pytest.mark.parametrize("suffix, where", [(".json", "record [1]"), (".jsonl", "line 2")])
@pytest.mark.parametrize("bad, named, reason", BAD_CONVERSATIONS)
def test_bad_openai_conversation(tmp_path, bad, named, reason, suffix, where):
    path = _write(tmp_path / f"data{suffix}", [MESSAGES[1], bad, MESSAGES[0]])
    with pytest.raises(DataError) as exc_info:
        load_records(str(path), conversations=True)
    _assert_one_line(exc_info, str(path), f"{where}: {named}", reason)


def _sharegpt(*turns):
    return {"conversations": [{"from": role, "value": value} for role, value in turns]}


BAD_SHAREGPT = [
    pytest.param({"conversations": []}, "field 'conversations'", "non-empty list", id="no-turns"),
    pytest.param(_sharegpt(("human", "hi"), ("bing", "a")), "conversations[1]: field 'from'", "unknown role 'bing'",
                 id="unknown-role"),
    pytest.param(_sharegpt(("human", "hi"), ("assistant", "a")), "conversations[1]: field 'from'",
                 "one of system, human, gpt", id="openai-role-in-sharegpt"),
    pytest.param({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
                 "conversations[0]: field 'value'", "missing", id="no-value"),
    pytest.param(_sharegpt(("human", "hi"), ("gpt", "")), "conversations[1]: field 'value'", "empty", id="empty"),
    pytest.param(_sharegpt(("human", "hi"), ("gpt", "a"), ("gpt", "b")), "conversations[2]",
                 "two assistant turns in a row (ShareGPT's human is user, gpt is assistant)", id="two-gpt-turns"),
    pytest.param(_sharegpt(("human", "hi"), ("gpt", "a"), ("human", "b")), "conversations[2]",
                 "must end with an assistant turn", id="ends-with-human"),
]


@pytest.mark.parametrize("bad, named, reason", BAD_SHAREGPT)
def test_bad_sharegpt_conversation(tmp_path, bad, named, reason):
    path = _write(tmp_path / "data.jsonl", [SHAREGPT[1], bad])
    with pytest.raises(DataError) as exc_info:
        load_records(str(path), conversations=True)
    _assert_one_line(exc_info, str(path), f"line 2: {named}", reason)


# --- rendering in turns ----------------------------------------------------------------------------------------

CONVERSATION = MESSAGES[0]["messages"]
PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n")


def test_a_conversation_in_turns_written_out():
    """The format, byte for byte: the first turn is the single-turn prompt (the system message its input), each
    answer ends on EOS's text, each later turn is the instruction block again."""
    assert conversation_prompt(TEMPLATE, CONVERSATION[:4], "</s>", multi_turn=True) == (
        PREAMBLE + "### Instruction:\nName the capital of Zorblax.\n\n### Input:\nAnswer in one word.\n\n"
        "### Response:Quibbletown.</s>### Instruction:\nAnd what river runs through it?\n\n### Response:")
    assert conversation_prompt(TEMPLATE, CONVERSATION, "</s>", multi_turn=True).endswith(
        "### Response:Silver.</s>### Instruction:\nSpell the river backwards.\n\n### Response:revliS</s>")
    lora = get_template("alpaca_lora")
    assert conversation_prompt(lora, CONVERSATION[1:4], "<|im_end|>", multi_turn=True).endswith(
        "### Response:\nQuibbletown.<|im_end|>### Instruction:\nAnd what river runs through it?\n\n### Response:\n")


@pytest.mark.parametrize("name", ["alpaca", "alpaca_lora"])
@pytest.mark.parametrize("turns", [[("user", "Hi")], [("system", "Be brief."), ("user", "Hi")],
                                   [("system", ""), ("system", "Two."), ("user", "Hi")]], ids=["user", "system", "two"])
def test_one_user_turn_renders_as_a_single_record_in_both_ways(name, turns):
    """A model's single-turn prompt does not depend on how it shows history: existing adapters are prompted as
    before, and a single-turn conversation trains exactly as the Alpaca record it is."""
    template = get_template(name)
    messages = [{"role": role, "content": content} for role, content in turns]
    system = "\n\n".join(content for role, content in turns if role == "system")
    expected = template.format("Hi", system)
    assert conversation_prompt(template, messages, "</s>", True) == conversation_prompt(template, messages, "</s>",
                                                                                       False) == expected


@pytest.mark.parametrize("turns, index, reason", [
    ([("user", "a"), ("user", "b")], 1, "two user turns in a row"),
    ([("assistant", "a"), ("user", "b")], 0, "starts with a user turn"),
    ([("user", "a"), ("assistant", "b"), ("developer", "c"), ("user", "d")], 2, "start of a conversation"),
    ([("system", "a")], 0, "needs a user turn"),
], ids=["two-users", "answer-first", "late-developer", "system-only"])
def test_what_turns_cannot_render_names_the_message(turns, index, reason):
    with pytest.raises(ConversationError, match=reason) as exc_info:
        conversation_prompt(TEMPLATE, [{"role": r, "content": c} for r, c in turns], "</s>", multi_turn=True)
    assert exc_info.value.index == index


def test_a_prompt_must_end_with_the_user(tiny_tokenizer):
    for multi_turn in (False, True):
        with pytest.raises(ConversationError, match="the last message must have role 'user'") as exc_info:
            Prompter(TEMPLATE, tiny_tokenizer, multi_turn).prompt(CONVERSATION[:3])
        assert exc_info.value.index == 2


# --- tokenizing: every answer learned, nothing else, each boundary the one generation sees ---------------------


def _labels(model_dir, tokenizer, dataset, tmp_path) -> list[list[int]]:
    """The labels TRL's SFTTrainer builds from the examples (completion-only loss, no packing)."""
    import trl
    from transformers import AutoModelForCausalLM

    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer,
                             train_dataset=dataset, args=trl.SFTConfig(
                                 output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, max_length=512,
                                 completion_only_loss=True, packing=False, report_to=[], use_cpu=True,
                                 train_sampling_strategy="sequential"))
    return [batch["labels"][0].tolist() for batch in trainer.get_train_dataloader()]


def test_three_turn_conversation_token_by_token(tiny_model_dir, tiny_tokenizer, tmp_path):
    prompter = Prompter(TEMPLATE, tiny_tokenizer, multi_turn=True)
    dataset, stats = tokenize_records(MESSAGES[:1], TEMPLATE, tiny_tokenizer, max_length=512, multi_turn=True)
    assert len(dataset) == 1 and stats["restarted"] == 0 and stats["truncated"] == 0
    expected_ids, expected_labels = [], []
    for index in (2, 4, 6):
        # what generation feeds the model before answer k: the server's prompt for the conversation up to there
        prompt = encode_prompt(tiny_tokenizer, prompter.prompt(CONVERSATION[:index]))
        assert prompt[: len(expected_ids)] == expected_ids  # ... begins with the example so far
        context, answer = prompt[len(expected_ids):], tiny_tokenizer(CONVERSATION[index]["content"],
                                                                     add_special_tokens=False)["input_ids"] + [EOS]
        assert BOS not in context or not expected_ids  # a later turn's prompt adds no second BOS
        expected_ids += context + answer
        expected_labels += [-100] * len(context) + answer
    assert dataset[0]["input_ids"] == expected_ids
    assert _labels(tiny_model_dir, tiny_tokenizer, dataset, tmp_path) == [expected_labels]
    learned = [token for token in expected_labels if token != -100]
    assert tiny_tokenizer.decode(learned) == "Quibbletown.</s>Silver.</s>revliS</s>"  # the answers and their EOS only
    assert expected_ids.count(EOS) == 3 and expected_ids[0] == BOS and expected_ids.count(BOS) == 1
    assert tiny_tokenizer.decode(expected_ids) == "<s>" + conversation_prompt(TEMPLATE, CONVERSATION, "</s>", True)


def test_weight_zero_keeps_an_answer_in_the_history_unlearned(tiny_tokenizer):
    unweighted = copy.deepcopy(MESSAGES[0])
    unweighted["messages"][4]["weight"] = 0
    (plain, weighted), _ = zip(*(tokenize_records([record], TEMPLATE, tiny_tokenizer, 512, multi_turn=True)
                                 for record in (MESSAGES[0], unweighted)))
    assert plain[0]["input_ids"] == weighted[0]["input_ids"]
    silver = tiny_tokenizer("Silver.", add_special_tokens=False)["input_ids"] + [EOS]
    learned = [t for t, m in zip(weighted[0]["input_ids"], weighted[0]["completion_mask"]) if m]
    assert sum(plain[0]["completion_mask"]) - sum(weighted[0]["completion_mask"]) == len(silver)
    assert tiny_tokenizer.decode(learned) == "Quibbletown.</s>revliS</s>"


def _turn_ends(tokenizer):
    dataset, _ = tokenize_records(MESSAGES[:1], TEMPLATE, tokenizer, 512, multi_turn=True)
    ids = dataset[0]["input_ids"]
    ends = [i + 1 for i, token in enumerate(ids) if token == EOS]
    first_answer = dataset[0]["completion_mask"].index(1)
    return ids, dataset[0]["completion_mask"], ends, first_answer


@pytest.mark.parametrize("truncation", ["cut", "cut_eos"])
def test_a_long_conversation_is_cut_after_its_last_whole_turn(tiny_tokenizer, truncation):
    ids, mask, ends, _ = _turn_ends(tiny_tokenizer)
    for max_length, kept in ((ends[2], 3), (ends[2] - 1, 2), (ends[1] + 3, 2), (ends[1], 2), (ends[0], 1)):
        dataset, stats = tokenize_records(MESSAGES[:1], TEMPLATE, tiny_tokenizer, max_length, truncation, True)
        end = ends[kept - 1]
        assert dataset[0]["input_ids"] == ids[:end] and dataset[0]["completion_mask"] == mask[:end]
        assert dataset[0]["input_ids"][-1] == EOS  # every kept answer whole, ending on its EOS
        assert (stats["truncated"], stats["turns_cut"]) == ((0, 0) if kept == 3 else (1, 3 - kept))
        assert stats["full_lengths"] == [len(ids)]


def test_a_first_answer_over_max_length_is_cut_as_a_single_record(tiny_tokenizer):
    ids, mask, ends, start = _turn_ends(tiny_tokenizer)
    max_length = ends[0] - 2  # inside the first answer
    cut, stats = tokenize_records(MESSAGES[:1], TEMPLATE, tiny_tokenizer, max_length, "cut", True)
    assert cut[0]["input_ids"] == ids[:max_length] and EOS not in ids[:max_length]
    assert (stats["truncated"], stats["turns_cut"], stats["dropped"]) == (1, 2, 0)
    cut_eos, _ = tokenize_records(MESSAGES[:1], TEMPLATE, tiny_tokenizer, max_length, "cut_eos", True)
    assert cut_eos[0]["input_ids"] == ids[: max_length - 1] + [EOS]
    assert cut_eos[0]["completion_mask"] == mask[:max_length]
    for max_length, truncation in ((start, "cut"), (start + 1, "cut_eos"), (start, "drop")):
        dropped, stats = tokenize_records(MESSAGES[:1], TEMPLATE, tiny_tokenizer, max_length, truncation, True)
        assert len(dropped) == 0 and (stats["dropped"], stats["dropped_too_long"]) == (1, 0)  # prompt alone too long


def test_drop_drops_the_whole_conversation(tiny_tokenizer):
    ids, _, ends, _ = _turn_ends(tiny_tokenizer)
    dataset, stats = tokenize_records(MESSAGES, TEMPLATE, tiny_tokenizer, ends[2] - 1, "drop", True)
    assert len(dataset) == 1 and dataset[0]["input_ids"][-1] == EOS  # the short conversation only
    assert (stats["dropped_too_long"], stats["truncated"], stats["dropped"]) == (1, 0, 0)


def test_a_history_that_retokenizes_differently_starts_a_new_example(demo_model_dir):
    """SmolLM2's tokenizer merges '::' across ':' of '### Response:' and an answer that begins with ':', so the
    history of turn 2 is not the ids turn 1 was learned with: turn 2 becomes an example of its own, whose prompt is
    its whole history as generation tokenizes it. Every answer is still learned once, at the boundary generation
    sees."""
    from alpaca_lora.model import load_tokenizer

    tokenizer = load_tokenizer(str(demo_model_dir))
    prompter = Prompter(TEMPLATE, tokenizer, multi_turn=True)
    messages = [{"role": "user", "content": "Show a scope operator."}, {"role": "assistant", "content": ":: yes"},
                {"role": "user", "content": "And a colon?"}, {"role": "assistant", "content": "A colon."}]
    dataset, stats = tokenize_records([{"messages": messages}], TEMPLATE, tokenizer, 512, multi_turn=True)
    assert len(dataset) == 2 and stats["restarted"] == 1
    assert stats["full_lengths"] == [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]
    for example, index in zip(dataset, (1, 3)):
        prompt = prompter.encode(prompter.prompt(messages[:index]))
        answer = tokenizer(messages[index]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert example["input_ids"] == prompt + answer
        assert example["completion_mask"] == [0] * len(prompt) + [1] * len(answer)


def test_the_summary_counts_conversations(tiny_tokenizer):
    from alpaca_lora.data.examples import summarize

    _, _, ends, _ = _turn_ends(tiny_tokenizer)
    _, stats = tokenize_records(MESSAGES, TEMPLATE, tiny_tokenizer, ends[1], "cut", True)
    summary = summarize(MESSAGES, stats, duplicates_dropped=1, max_length=ends[1])
    assert (summary.conversations, summary.answers, summary.turns_cut, summary.truncated) == (2, 4, 1, 1)
    assert summary.with_input == pytest.approx(0.5)  # one of the two has a system message
    lines = summary.lines()
    assert "rows: 2 conversations (1 exact duplicates dropped), 4 answers, with a system message: 50.0%" in lines[0]
    assert "1 examples cut (1 answers left out at turn boundaries)" in lines[2]


# --- template=model: the base's own chat template --------------------------------------------------------------


def test_template_model_masks_every_answer_exactly(demo_model_dir):
    """SmolLM2's own ChatML template: each answer's prompt is apply_chat_template(..., add_generation_prompt=True)
    of the conversation up to it, the answer is learned through <|im_end|>, the newline after it is the next
    prompt's; an Alpaca record is one user message."""
    from alpaca_lora.model import load_tokenizer

    tokenizer = load_tokenizer(str(demo_model_dir))
    model = get_template("model")
    dataset, stats = tokenize_records(MESSAGES + [ALPACA | {"input": "Add them."}], model, tokenizer, 512)
    assert len(dataset) == 3 and stats["restarted"] == 0
    ids, mask = dataset[0]["input_ids"], dataset[0]["completion_mask"]
    expected, expected_mask = [], []
    for index in (2, 4, 6):
        prompt = tokenizer.apply_chat_template(CONVERSATION[:index], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        assert prompt[: len(expected)] == expected
        answer = tokenizer(CONVERSATION[index]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        expected_mask += [0] * (len(prompt) - len(expected)) + [1] * len(answer)
        expected = prompt + answer
    assert ids == expected and mask == expected_mask
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == "Quibbletown.<|im_end|>Silver.<|im_end|>revliS<|im_end|>"
    record = dataset[2]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?\n\nAdd them."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    assert record["input_ids"] == prompt + tokenizer("42<|im_end|>", add_special_tokens=False)["input_ids"]


def test_template_model_is_refused_where_the_base_has_no_chat_template(tiny_tokenizer):
    from alpaca_lora.data.templates import TemplateError, set_chat_template

    assert not tiny_tokenizer.chat_template
    with pytest.raises(TemplateError) as exc_info:
        set_chat_template(copy.deepcopy(tiny_tokenizer), get_template("model"))
    _assert_one_line(exc_info, "template=model", "has none", "template=alpaca")


def test_template_model_refuses_a_template_that_never_ends_an_answer_on_eos(demo_model_dir):
    from alpaca_lora.model import load_tokenizer

    tokenizer = load_tokenizer(str(demo_model_dir))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError) as exc_info:
        tokenize_records(MESSAGES[1:], get_template("model"), tokenizer, 512)
    _assert_one_line(exc_info, "template=model", "EOS", "'<|im_end|>'")
