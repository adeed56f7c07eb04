"""Turning records into training examples: prompt masking, EOS, truncation, the split.

Each example is ``input_ids`` plus a ``completion_mask`` (1 where the loss applies), the
pre-tokenized form TRL's SFTTrainer reads. The prompt is tokenized on its own, exactly as
generation tokenizes it, so the boundary the model learns is the one it sees at inference.
Every example that fits ends on a learned EOS. An over-long one (``truncation``) is ``cut`` as
Stanford's and alpaca-lora's recipes cut it (no EOS after a cut: the model must not learn to stop
mid-sentence), ``cut_eos`` (cut, then EOS) or ``drop``ped, and each kind is counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import datasets
import numpy as np

from alpaca_lora.common.errors import DataError
from alpaca_lora.data.templates import PromptTemplate


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids as training and generation both use them: special tokens (BOS) but never EOS."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if ids and ids[-1] == tokenizer.eos_token_id and ids[-1] != tokenizer.bos_token_id:
        ids = ids[:-1]
    return ids


def left_padded_prompts(tokenizer, prompts: list[str]) -> dict:
    """A batch of prompts for generation: encoded as training encodes them, padded on the left."""
    ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    return tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")


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

    def lines(self) -> list[str]:
        return [
            f"rows: {self.rows} ({self.duplicates_dropped} exact duplicates dropped), "
            f"with input: {self.with_input:.1%}",
            f"tokens per example: p50 {self.length_p50}, p90 {self.length_p90}, p99 {self.length_p99}, "
            f"max {self.length_max}",
            f"at max_length={self.max_length}: {self.truncated} responses truncated "
            f"({'cut, then EOS' if self.truncation == 'cut_eos' else 'cut, no EOS'}), "
            f"{self.dropped_too_long} dropped as too long (truncation={self.truncation}), "
            f"{self.dropped_prompt_too_long} dropped (prompt alone too long)",
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_records(
    records: list[dict[str, str]], template: PromptTemplate, tokenizer, max_length: int, truncation: str = "cut"
) -> tuple[datasets.Dataset, dict[str, int | list[int]]]:
    """Tokenized examples (``input_ids``, ``completion_mask``) and length statistics."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: set one, or the model never learns to stop")
    eos = tokenizer.eos_token_id
    prompt_ids = [encode_prompt(tokenizer, template.format(r["instruction"], r["input"])) for r in records]
    response_ids = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"] if records else []
    rows = {"input_ids": [], "completion_mask": []}
    full_lengths, truncated, dropped, too_long = [], 0, 0, 0
    for prompt, response in zip(prompt_ids, response_ids):
        full_lengths.append(len(prompt) + len(response) + 1)
        room = max_length - len(prompt)  # completion tokens (response and EOS) that fit
        if room < 1 or (truncation == "cut_eos" and room < 2):
            dropped += 1
            continue
        completion = response + [eos]
        if len(completion) > room:
            if truncation == "drop":
                too_long += 1
                continue
            truncated += 1
            completion = response[: room - 1] + [eos] if truncation == "cut_eos" else response[:room]
        rows["input_ids"].append(prompt + completion)
        rows["completion_mask"].append([0] * len(prompt) + [1] * len(completion))
    stats = {"full_lengths": full_lengths, "truncated": truncated, "dropped": dropped, "dropped_too_long": too_long}
    return datasets.Dataset.from_dict(rows), stats


def summarize(
    records: list[dict[str, str]], stats: dict, duplicates_dropped: int, max_length: int, truncation: str = "cut"
) -> DataSummary:
    lengths = np.asarray(stats["full_lengths"] or [0])
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    return DataSummary(
        rows=len(records),
        with_input=sum(bool(r["input"]) for r in records) / max(len(records), 1),
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
