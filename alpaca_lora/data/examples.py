"""Turning records into training examples: prompt masking, EOS, truncation, the split.

Each example is ``input_ids`` plus a ``completion_mask`` (1 where the loss applies), the
pre-tokenized form TRL's SFTTrainer reads. Every answer is a turn: the prompt before it is tokenized
on its own, exactly as generation tokenizes it (for a conversation, the whole conversation up to that
answer's generation prompt), and the answer is learned with the EOS it ends on. A conversation is one
example while the ids of each turn's prompt begin with the example so far (the history re-tokenizes
to the same ids); where they do not, a new example starts with that prompt, so every learned boundary is
the one generation sees. An over-long example (``truncation``) is ``cut`` as Stanford's and
alpaca-lora's recipes cut it (no EOS after a cut: the model must not learn to stop mid-sentence),
``cut_eos`` (cut, then EOS) or ``drop``ped; a conversation is cut after its last whole turn that fits
(its first turn is cut as a single record is), and each kind is counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import datasets
import numpy as np

from alpaca_lora.common.errors import DataError
from alpaca_lora.data.templates import (
    ConversationError,
    ModelTemplate,
    Prompter,
    PromptTemplate,
    encode_prompt,
    record_message,
)


def left_padded_prompts(tokenizer, prompts: list[str], encode=None) -> dict:
    """A batch of prompts for generation: encoded as training encodes them (``encode``: a
    :meth:`Prompter.encode`; default :func:`encode_prompt`), padded on the left."""
    ids = [(encode or (lambda prompt: encode_prompt(tokenizer, prompt)))(prompt) for prompt in prompts]
    return tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")


@dataclass
class Turn:
    """One answer to learn: the prompt generation gives the model before it, and the answer with its EOS."""

    prompt: list[int]
    completion: list[int]
    trained: bool = True  # OpenAI's per-message weight 0: the answer stays in the conversation, unlearned


@dataclass
class DataSummary:
    rows: int
    with_input: float
    duplicates_dropped: int
    length_p50: int
    length_p90: int
    length_p99: int
    length_max: int
    truncated: int
    dropped_too_long: int
    dropped_prompt_too_long: int
    max_length: int
    truncation: str
    conversations: int = 0  # records that are conversations (messages or ShareGPT)
    answers: int = 0  # assistant turns, in all records
    turns_cut: int = 0  # answers left out where a conversation was cut at a turn boundary
    restarted: int = 0  # turns that began a new example (their history re-tokenized to other ids)

    def lines(self) -> list[str]:
        if self.conversations:
            first = (f"rows: {self.rows} conversations ({self.duplicates_dropped} exact duplicates dropped), "
                     f"{self.answers} answers, with a system message: {self.with_input:.1%}; {self.restarted} turns "
                     "began a new example (the prompt before them does not continue the one so far)")
        else:
            first = (f"rows: {self.rows} ({self.duplicates_dropped} exact duplicates dropped), "
                     f"with input: {self.with_input:.1%}")
        how = "cut, then EOS" if self.truncation == "cut_eos" else "cut, no EOS"
        cut = f"{self.truncated} responses truncated ({how})"
        if self.conversations:
            cut = f"{self.truncated} examples cut ({self.turns_cut} answers left out at turn boundaries)"
        return [
            first,
            f"tokens per example: p50 {self.length_p50}, p90 {self.length_p90}, p99 {self.length_p99}, "
            f"max {self.length_max}",
            f"at max_length={self.max_length}: {cut}, "
            f"{self.dropped_too_long} dropped as too long (truncation={self.truncation}), "
            f"{self.dropped_prompt_too_long} dropped (prompt alone too long)",
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def is_conversation(record: dict) -> bool:
    return "messages" in record


def tokenize_records(
    records: list[dict], template: PromptTemplate | ModelTemplate, tokenizer, max_length: int,
    truncation: str = "cut", multi_turn: bool = False,
) -> tuple[datasets.Dataset, dict[str, int | list[int]]]:
    """Tokenized examples (``input_ids``, ``completion_mask``) and length statistics, from Alpaca records or
    conversations (``{"messages": [...]}``), prompted as ``Prompter(template, tokenizer, multi_turn)`` prompts."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: set one, or the model never learns to stop")
    prompter = Prompter(template, tokenizer, multi_turn)
    turns = model_template_turns(prompter, records) if prompter.own_template else template_turns(prompter, records)
    rows = {"input_ids": [], "completion_mask": []}
    stats = {"full_lengths": [], "truncated": 0, "dropped": 0, "dropped_too_long": 0, "turns_cut": 0,
             "restarted": 0}
    for conversation in turns:
        for example in join_turns(conversation, stats):
            example = truncated(example, max_length, truncation, tokenizer.eos_token_id, stats)
            if example is not None:
                rows["input_ids"].append(example[0])
                rows["completion_mask"].append(example[1])
    return datasets.Dataset.from_dict(rows), stats


def template_turns(prompter: Prompter, records: list[dict]) -> list[list[Turn]]:
    """The turns of every record with one of our templates: each prompt encoded as generation encodes it (for
    a conversation, rendered up to that answer), each answer tokenized on its own (in one batch), then EOS."""
    places, prompts, answers, trained = [], [], [], []
    for number, record in enumerate(records):
        if not is_conversation(record):
            places.append(number)
            prompts.append(prompter.template.format(record["instruction"], record["input"]))
            answers.append(record["output"])
            trained.append(True)
            continue
        messages = record["messages"]
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                places.append(number)
                prompts.append(_rendered(prompter, messages[:index]))
                answers.append(message["content"])
                trained.append(message.get("weight", 1) != 0)
    answer_ids = prompter.tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []
    turns: list[list[Turn]] = [[] for _ in records]
    eos = prompter.tokenizer.eos_token_id
    for number, prompt, answer, learned in zip(places, prompter.encode_all(prompts), answer_ids, trained):
        turns[number].append(Turn(prompt, answer + [eos], learned))
    return turns


def model_template_turns(prompter: Prompter, records: list[dict]) -> list[list[Turn]]:
    """The turns of every record with the tokenizer's own chat template: the ids of the conversation rendered
    up to an answer's generation prompt, and of the conversation rendered through that answer, must begin the
    same; the answer is what follows, through the first EOS (the template's glue after it is the next prompt's)."""
    eos, turns = prompter.tokenizer.eos_token_id, []
    for record in records:
        messages = record["messages"] if is_conversation(record) else [
            {"role": "user", "content": record_message(record["instruction"], record["input"])},
            {"role": "assistant", "content": record["output"]}]
        found = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = prompter.encode(_rendered(prompter, messages[:index]))
            whole = prompter.encode(prompter.render(messages[: index + 1]))
            if whole[: len(prompt)] != prompt:
                raise DataError(f"template=model: the chat template renders a conversation through an answer "
                                f"(message {index}) other than its generation prompt followed by the answer, so the "
                                "answer's tokens cannot be told apart exactly; use template=alpaca")
            answer = whole[len(prompt):]
            if eos not in answer:
                raise DataError(f"template=model: the chat template does not end an answer with the tokenizer's EOS "
                                f"({prompter.tokenizer.eos_token!r}), so the model would never learn to stop; set the "
                                "tokenizer's EOS to the template's end of turn, or use template=alpaca")
            found.append(Turn(prompt, answer[: answer.index(eos) + 1], message.get("weight", 1) != 0))
        turns.append(found)
    return turns


def _rendered(prompter: Prompter, messages: list[dict]) -> str:
    try:
        return prompter.prompt(messages)
    except ConversationError as exc:  # the loader checked every conversation: only a template can refuse one
        raise DataError(f"template {prompter.template.name}: {exc}") from None


def join_turns(turns: list[Turn], stats: dict) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """A record's turns as examples ``(ids, mask, where each answer starts, where each ends)``: each turn's prompt
    must begin with the example so far, and what it adds is masked; a turn whose prompt does not starts a new
    example."""
    examples, ids, mask, starts, ends = [], [], [], [], []
    for turn in turns:
        if turn.prompt[: len(ids)] != ids:
            examples.append((ids, mask, starts, ends))
            ids, mask, starts, ends = [], [], [], []
            stats["restarted"] += 1
        context = turn.prompt[len(ids):]
        starts = starts + [len(ids) + len(context)]
        ids = ids + context + turn.completion
        mask = mask + [0] * len(context) + [int(turn.trained)] * len(turn.completion)
        ends = ends + [len(ids)]
    examples.append((ids, mask, starts, ends))
    stats["full_lengths"] += [len(example[0]) for example in examples]
    return examples


def truncated(example: tuple[list[int], list[int], list[int], list[int]], max_length: int, truncation: str,
              eos: int, stats: dict) -> tuple[list[int], list[int]] | None:
    """The example within ``max_length``, or None (dropped), counted in ``stats``. One that fits is kept whole;
    one whose first prompt leaves no room for an answer token (and its EOS, with ``cut_eos``) is dropped; ``drop``
    drops any other that does not fit; ``cut`` and ``cut_eos`` keep its whole turns that fit, or else cut its
    first answer as a single record's (no EOS after the cut, or EOS with ``cut_eos``)."""
    ids, mask, starts, ends = example
    if len(ids) <= max_length:
        return ids, mask
    room = max_length - starts[0]  # answer tokens (and EOS) of the first turn that fit after its prompt
    if room < 1 or (truncation == "cut_eos" and room < 2):
        stats["dropped"] += 1
        return None
    if truncation == "drop":
        stats["dropped_too_long"] += 1
        return None
    stats["truncated"] += 1
    fitting = [end for end in ends if end <= max_length]
    stats["turns_cut"] += len(ends) - max(len(fitting), 1)
    if fitting:
        return ids[: fitting[-1]], mask[: fitting[-1]]
    if truncation == "cut_eos":
        return ids[: max_length - 1] + [eos], mask[:max_length]
    return ids[:max_length], mask[:max_length]


def summarize(
    records: list[dict], stats: dict, duplicates_dropped: int, max_length: int, truncation: str = "cut"
) -> DataSummary:
    """The data's figures for the log and metrics.json; for conversations, ``with_input`` is the share with a
    system message."""
    lengths = np.asarray(stats["full_lengths"] or [0])
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    conversations = [r["messages"] for r in records if is_conversation(r)]
    context = [bool(r["input"]) for r in records if not is_conversation(r)] + \
        [m[0]["role"] == "system" for m in conversations]
    return DataSummary(
        rows=len(records),
        with_input=sum(context) / max(len(records), 1),
        duplicates_dropped=duplicates_dropped,
        length_p50=p50,
        length_p90=p90,
        length_p99=p99,
        length_max=int(lengths.max()),
        truncated=stats["truncated"],
        dropped_too_long=stats.get("dropped_too_long", 0),
        dropped_prompt_too_long=stats["dropped"],
        max_length=max_length,
        truncation=truncation,
        conversations=len(conversations),
        answers=sum(m["role"] == "assistant" for messages in conversations for m in messages)
        + len(records) - len(conversations),
        turns_cut=stats.get("turns_cut", 0),
        restarted=stats.get("restarted", 0),
    )


def split_records(
    records: list[dict[str, str]], val_set_size: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A seeded train/validation split: ``val_set_size`` < 1 is a fraction, >= 1 a row count, 0 none."""
    if not val_set_size:
        return records, []
    if val_set_size >= 1 and (val_set_size != int(val_set_size) or val_set_size >= len(records)):
        raise DataError(
            f"val_set_size={val_set_size:g} must be a whole number of rows below the {len(records)} rows available"
        )
    size = int(val_set_size) if val_set_size >= 1 else val_set_size
    try:
        split = datasets.Dataset.from_list(records).train_test_split(test_size=size, seed=seed)
    except ValueError:  # a fraction that leaves one side empty
        raise DataError(f"val_set_size={val_set_size:g} leaves no rows on one side of the "
                        f"{len(records)} rows") from None
    return split["train"].to_list(), split["test"].to_list()
