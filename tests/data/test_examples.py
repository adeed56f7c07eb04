"""Records to training examples: prompt masking, the EOS rule, truncation, statistics, the split,
and the labels TRL's SFTTrainer really builds from them."""

from __future__ import annotations

import copy

import pytest

from alpaca_lora.common.errors import DataError
from alpaca_lora.data.examples import (
    DataSummary,
    encode_prompt,
    split_records,
    summarize,
    tokenize_records,
)
from alpaca_lora.data.templates import get_template

BOS, EOS, PAD = 1, 2, 3
TEMPLATE = get_template("alpaca")

RECORDS = [
    {"instruction": "Reverse the order of the words.", "input": "apple river stone", "output": "stone river apple"},
    {"instruction": "What is 12 plus 30?", "input": "", "output": "42"},
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat well, sleep well and exercise daily. Drink water and take a walk in the garden."},
    {"instruction": "Name the capital of the country.", "input": "Zorblax", "output": "Quibbletown."},
]
LONG_OUTPUT = " ".join(["apple river stone cloud garden window silver orange candle forest"] * 6)


def _prompt_ids(tokenizer, record):
    return encode_prompt(tokenizer, TEMPLATE.format(record["instruction"], record["input"]))


def _response_ids(tokenizer, record):
    return tokenizer(record["output"], add_special_tokens=False)["input_ids"]


def test_tokenizer_fixture_ids(tiny_tokenizer):
    # The assertions below rely on these ids; PAD deliberately differs from EOS.
    assert (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id) == (BOS, EOS, PAD)


def test_encode_prompt_has_bos_and_no_eos(tiny_tokenizer):
    ids = _prompt_ids(tiny_tokenizer, RECORDS[0])
    assert ids[0] == BOS
    assert EOS not in ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == TEMPLATE.format(
        RECORDS[0]["instruction"], RECORDS[0]["input"])


# (a) masking and EOS
def test_prompt_is_masked_prefix_and_completion_ends_with_eos(tiny_tokenizer):
    dataset, stats = tokenize_records(RECORDS, TEMPLATE, tiny_tokenizer, max_length=512)
    assert len(dataset) == len(RECORDS)
    assert set(dataset.column_names) == {"input_ids", "completion_mask"}
    assert stats["truncated"] == 0 and stats["dropped"] == 0
    for record, example in zip(RECORDS, dataset):
        ids, mask = example["input_ids"], example["completion_mask"]
        prompt = _prompt_ids(tiny_tokenizer, record)
        assert len(ids) == len(mask)
        assert ids[: len(prompt)] == prompt
        assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
        assert ids[-1] == EOS and mask[-1] == 1
        assert ids.count(EOS) == 1
        completion = ids[len(prompt):-1]
        assert completion  # every example teaches a non-empty answer
        assert tiny_tokenizer.decode(completion) == record["output"]
        assert len(ids) == stats["full_lengths"][RECORDS.index(record)]


def test_alpaca_lora_template_prompt_differs(tiny_tokenizer):
    # The template really drives the prompt tokens (the alpaca_lora one ends with an extra newline).
    lora = get_template("alpaca_lora")
    a, _ = tokenize_records(RECORDS[:1], TEMPLATE, tiny_tokenizer, max_length=512)
    b, _ = tokenize_records(RECORDS[:1], lora, tiny_tokenizer, max_length=512)
    prompt_b = encode_prompt(tiny_tokenizer, lora.format(RECORDS[0]["instruction"], RECORDS[0]["input"]))
    assert b[0]["input_ids"][: len(prompt_b)] == prompt_b
    assert b[0]["completion_mask"].count(0) == len(prompt_b)
    assert a[0]["input_ids"] != b[0]["input_ids"]


def test_no_eos_token_is_an_error(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = None
    assert tokenizer.eos_token_id is None
    with pytest.raises(DataError, match="EOS"):
        tokenize_records(RECORDS, TEMPLATE, tokenizer, max_length=512)


# (b) truncation: cut (no EOS after a cut, the default), cut_eos, drop
def test_a_cut_response_does_not_learn_to_stop_mid_sentence(tiny_tokenizer):
    """The default, as Stanford's train.py and alpaca-lora's finetune.py cut: no EOS after a cut."""
    record = {"instruction": "Repeat the words.", "input": "", "output": LONG_OUTPUT}
    prompt, response = _prompt_ids(tiny_tokenizer, record), _response_ids(tiny_tokenizer, record)
    max_length = len(prompt) + 10
    dataset, stats = tokenize_records([record, RECORDS[1]], TEMPLATE, tiny_tokenizer, max_length=max_length)
    assert (stats["truncated"], stats["dropped"], stats["dropped_too_long"]) == (1, 0, 0)
    ids, mask = dataset[0]["input_ids"], dataset[0]["completion_mask"]
    assert ids == prompt + response[:10] and EOS not in ids
    assert mask == [0] * len(prompt) + [1] * 10
    assert dataset[1]["input_ids"][-1] == EOS  # one that fits still ends on its EOS


def test_drop_leaves_out_and_counts_what_does_not_fit(tiny_tokenizer):
    record = {"instruction": "Repeat the words.", "input": "", "output": LONG_OUTPUT}
    max_length = len(_prompt_ids(tiny_tokenizer, record)) + 10
    dataset, stats = tokenize_records([record, RECORDS[1]], TEMPLATE, tiny_tokenizer, max_length=max_length,
                                      truncation="drop")
    assert (stats["truncated"], stats["dropped"], stats["dropped_too_long"], len(dataset)) == (0, 0, 1, 1)
    assert dataset[0]["input_ids"][-1] == EOS
    summary = summarize([record, RECORDS[1]], stats, 0, max_length, "drop")
    assert summary.dropped_too_long == 1 and "1 dropped as too long (truncation=drop)" in summary.lines()[2]


def test_cut_eos_appends_eos_after_the_cut(tiny_tokenizer):
    """The old behaviour, still available: the model learns to stop where the cut fell."""
    record = {"instruction": "Repeat the words.", "input": "", "output": LONG_OUTPUT}
    prompt = _prompt_ids(tiny_tokenizer, record)
    response = _response_ids(tiny_tokenizer, record)
    max_length = len(prompt) + 10
    assert len(response) > 10
    dataset, stats = tokenize_records([record, RECORDS[1]], TEMPLATE, tiny_tokenizer, max_length=max_length,
                                      truncation="cut_eos")
    assert stats["truncated"] == 1
    assert stats["dropped"] == 0
    assert stats["full_lengths"][0] == len(prompt) + len(response) + 1  # the untruncated length
    ids, mask = dataset[0]["input_ids"], dataset[0]["completion_mask"]
    assert len(ids) == max_length == len(mask)
    assert ids[-1] == EOS and mask[-1] == 1
    assert ids == prompt + response[:9] + [EOS]
    assert mask == [0] * len(prompt) + [1] * 10
    assert dataset[1]["input_ids"][-1] == EOS  # the short one is untouched
    assert len(dataset[1]["input_ids"]) < max_length


def test_truncation_boundary(tiny_tokenizer):
    record = RECORDS[2]
    prompt, response = _prompt_ids(tiny_tokenizer, record), _response_ids(tiny_tokenizer, record)
    exact = len(prompt) + len(response) + 1
    for truncation in ("cut", "cut_eos", "drop"):
        fits, stats = tokenize_records([record], TEMPLATE, tiny_tokenizer, max_length=exact, truncation=truncation)
        assert stats["truncated"] == 0
        assert fits[0]["input_ids"] == prompt + response + [EOS]
    cut, stats = tokenize_records([record], TEMPLATE, tiny_tokenizer, max_length=exact - 1)
    assert stats["truncated"] == 1
    assert cut[0]["input_ids"] == prompt + response  # one token short: the EOS is what is cut
    cut, stats = tokenize_records([record], TEMPLATE, tiny_tokenizer, max_length=exact - 1, truncation="cut_eos")
    assert stats["truncated"] == 1
    assert cut[0]["input_ids"] == prompt + response[:-1] + [EOS]


# (c) prompts that cannot fit
def test_prompt_too_long_is_dropped(tiny_tokenizer):
    long_prompt = {"instruction": "Summarize the text.", "input": LONG_OUTPUT, "output": "Words."}
    prompt_len = len(_prompt_ids(tiny_tokenizer, long_prompt))
    short_len = len(_prompt_ids(tiny_tokenizer, RECORDS[1]))
    max_length = prompt_len  # the prompt alone fills max_length: no room for any answer or EOS
    assert short_len + 3 < max_length
    records = [RECORDS[1], long_prompt, RECORDS[3]]
    dataset, stats = tokenize_records(records, TEMPLATE, tiny_tokenizer, max_length=max_length)
    assert stats["dropped"] == 1
    assert len(dataset) == 2
    assert len(stats["full_lengths"]) == 3  # statistics still cover every record
    kept_prompts = [ex["input_ids"][: ex["completion_mask"].count(0)] for ex in dataset]
    assert kept_prompts == [_prompt_ids(tiny_tokenizer, RECORDS[1]), _prompt_ids(tiny_tokenizer, RECORDS[3])]

    _, stats = tokenize_records(records, TEMPLATE, tiny_tokenizer, max_length=prompt_len - 7)
    assert stats["dropped"] == 1


def test_prompt_near_max_length(tiny_tokenizer):
    record = RECORDS[2]
    prompt, response = _prompt_ids(tiny_tokenizer, record), _response_ids(tiny_tokenizer, record)
    # cut_eos with room for exactly one response token plus EOS: kept and truncated.
    dataset, stats = tokenize_records([record], TEMPLATE, tiny_tokenizer, max_length=len(prompt) + 2,
                                      truncation="cut_eos")
    assert (stats["dropped"], stats["truncated"]) == (0, 1)
    assert dataset[0]["input_ids"] == prompt + response[:1] + [EOS]
    # Room for EOS only (an empty answer): dropped, never trained as an empty response.
    dataset, stats = tokenize_records([record], TEMPLATE, tiny_tokenizer, max_length=len(prompt) + 1,
                                      truncation="cut_eos")
    assert (stats["dropped"], len(dataset)) == (1, 0)
    # cut: one response token, no EOS; nothing at all fits when the prompt fills max_length.
    dataset, stats = tokenize_records([record], TEMPLATE, tiny_tokenizer, max_length=len(prompt) + 1)
    assert dataset[0]["input_ids"] == prompt + response[:1]
    dataset, stats = tokenize_records([record], TEMPLATE, tiny_tokenizer, max_length=len(prompt))
    assert (stats["dropped"], len(dataset)) == (1, 0)


# (d) summary
def test_summarize_percentiles_exact():
    records = [{"instruction": "i", "input": "x" if k % 4 == 0 else "", "output": "o"} for k in range(101)]
    stats = {"full_lengths": list(range(100, -1, -1)), "truncated": 7, "dropped": 2}
    summary = summarize(records, stats, duplicates_dropped=5, max_length=64)
    assert isinstance(summary, DataSummary)
    assert summary.rows == 101
    assert summary.with_input == pytest.approx(26 / 101)
    assert (summary.length_p50, summary.length_p90, summary.length_p99, summary.length_max) == (50, 90, 99, 100)
    assert (summary.truncated, summary.dropped_prompt_too_long, summary.duplicates_dropped) == (7, 2, 5)
    assert summary.max_length == 64
    assert summary.to_dict()["length_p90"] == 90
    lines = summary.lines()
    assert len(lines) == 3
    assert "rows: 101 (5 exact duplicates dropped)" in lines[0]
    assert "p50 50, p90 90, p99 99, max 100" in lines[1]
    assert "max_length=64: 7 responses truncated" in lines[2] and "2 dropped" in lines[2]


def test_summarize_uses_full_lengths(tiny_tokenizer):
    long = {"instruction": "Repeat the words.", "input": "", "output": LONG_OUTPUT}
    records = RECORDS + [long]
    max_length = 80
    dataset, stats = tokenize_records(records, TEMPLATE, tiny_tokenizer, max_length=max_length)
    summary = summarize(records, stats, duplicates_dropped=0, max_length=max_length)
    full = [len(_prompt_ids(tiny_tokenizer, r)) + len(_response_ids(tiny_tokenizer, r)) + 1 for r in records]
    assert stats["full_lengths"] == full
    assert summary.rows == 5
    assert summary.with_input == pytest.approx(2 / 5)
    assert summary.length_max == max(full) > max_length  # before truncation, not after
    assert max(len(ids) for ids in dataset["input_ids"]) == max_length
    assert summary.length_p50 == sorted(full)[2]
    assert summary.truncated == stats["truncated"] >= 1


def test_summarize_empty():
    summary = summarize([], {"full_lengths": [], "truncated": 0, "dropped": 0}, 0, 32)
    assert (summary.rows, summary.with_input, summary.length_max) == (0, 0, 0)


# (e) the split
def _numbered(n):
    return [{"instruction": f"task {k}", "input": "", "output": str(k)} for k in range(n)]


def _keys(records):
    return [r["instruction"] for r in records]


def test_split_fraction_and_count():
    records = _numbered(100)
    train, val = split_records(records, 0.1, seed=0)
    assert (len(train), len(val)) == (90, 10)
    train, val = split_records(records, 7, seed=0)
    assert (len(train), len(val)) == (93, 7)
    train, val = split_records(records, 7.0, seed=0)
    assert (len(train), len(val)) == (93, 7)


@pytest.mark.parametrize("size", [0.2, 13])
def test_split_disjoint_covering_and_seeded(size):
    records = _numbered(60)
    train, val = split_records(records, size, seed=42)
    assert not set(_keys(train)) & set(_keys(val))
    assert sorted(_keys(train) + _keys(val)) == sorted(_keys(records))
    assert all(r in records for r in train + val)  # records come back whole, unchanged
    again_train, again_val = split_records(records, size, seed=42)
    assert (_keys(again_train), _keys(again_val)) == (_keys(train), _keys(val))
    _, other_val = split_records(records, size, seed=7)
    assert set(_keys(other_val)) != set(_keys(val))


def test_split_zero_is_no_split():
    records = _numbered(5)
    train, val = split_records(records, 0, seed=0)
    assert train == records and val == []


@pytest.mark.parametrize("size", [10, 11, 250, 2.5, 1.5])
def test_split_bad_size(size):
    with pytest.raises(DataError) as exc_info:
        split_records(_numbered(10), size, seed=0)
    message = str(exc_info.value)
    assert "\n" not in message and "val_set_size" in message and "10" in message


@pytest.mark.parametrize("records, size", [(_numbered(10), 0.99), (_numbered(1), 0.5)], ids=["0.99-of-10", "0.5-of-1"])
def test_split_fraction_leaving_no_training_rows(records, size):
    with pytest.raises(DataError, match="val_set_size"):
        split_records(records, size, seed=0)


# (f) real batches through TRL's SFTTrainer
TRL_RECORDS = RECORDS + [{"instruction": "Repeat the words.", "input": "", "output": LONG_OUTPUT}]
TRL_MAX_LENGTH = 80


def _first_batch(model_dir, tokenizer, dataset, tmp_path, completion_only_loss):
    import trl
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = trl.SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        args=trl.SFTConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=len(dataset),
            max_length=TRL_MAX_LENGTH,
            completion_only_loss=completion_only_loss,
            report_to=[],
            use_cpu=True,
        ),
    )
    return next(iter(trainer.get_train_dataloader()))


def _rows(batch, dataset, pad_id):
    """Each batch row, checked for right padding, with the dataset example it came from."""
    by_ids = {tuple(ex["input_ids"]): ex for ex in dataset}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == len(dataset)
    rows, seen = [], set()
    for ids, labels, attention in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                      batch["attention_mask"].tolist()):
        n = sum(attention)
        assert attention == [1] * n + [0] * (len(ids) - n)  # padding on the right
        assert ids[n:] == [pad_id] * (len(ids) - n)
        assert labels[n:] == [-100] * (len(ids) - n)
        example = by_ids[tuple(ids[:n])]
        seen.add(tuple(ids[:n]))
        rows.append((ids[:n], labels[:n], example))
    assert len(seen) == len(dataset)
    assert len({len(r[0]) for r in rows}) > 1 and min(sum(a) for a in batch["attention_mask"].tolist()) < len(
        batch["input_ids"][0])  # rows of different lengths: padding really happened
    return rows


def _assert_completion_only_labels(rows):
    for ids, labels, example in rows:
        mask = example["completion_mask"]
        n_prompt = mask.count(0)
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert labels[-1] == EOS == ids[-1]  # the last real label is the learned EOS
        assert [lbl for lbl in labels if lbl != -100][-1] == EOS


def test_trl_batch_masks_prompt_and_keeps_eos(tiny_model_dir, tiny_tokenizer, tmp_path):
    dataset, stats = tokenize_records(TRL_RECORDS, TEMPLATE, tiny_tokenizer, max_length=TRL_MAX_LENGTH,
                                      truncation="cut_eos")
    assert stats["truncated"] == 1 and len(dataset) == len(TRL_RECORDS)
    batch = _first_batch(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, completion_only_loss=True)
    rows = _rows(batch, dataset, pad_id=PAD)
    _assert_completion_only_labels(rows)
    assert max(len(ids) for ids, _, _ in rows) == TRL_MAX_LENGTH  # the truncated row still ends in EOS


def test_trl_batch_of_a_cut_response_ends_without_eos(tiny_model_dir, tiny_tokenizer, tmp_path):
    """truncation=cut (the default): the cut row's labels run to max_length and stop there, no EOS."""
    dataset, stats = tokenize_records(TRL_RECORDS, TEMPLATE, tiny_tokenizer, max_length=TRL_MAX_LENGTH)
    assert stats["truncated"] == 1
    rows = _rows(_first_batch(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, completion_only_loss=True),
                 dataset, pad_id=PAD)
    cut = [(ids, labels) for ids, labels, _ in rows if len(ids) == TRL_MAX_LENGTH]
    assert len(cut) == 1 and EOS not in cut[0][0] and cut[0][1][-1] == cut[0][0][-1] != -100
    assert all(labels[-1] == EOS for ids, labels, _ in rows if len(ids) < TRL_MAX_LENGTH)


def test_trl_batch_keeps_eos_label_when_pad_is_eos(tiny_model_dir, tiny_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == EOS
    dataset, _ = tokenize_records(TRL_RECORDS, TEMPLATE, tokenizer, max_length=TRL_MAX_LENGTH,
                                  truncation="cut_eos")
    batch = _first_batch(tiny_model_dir, tokenizer, dataset, tmp_path, completion_only_loss=True)
    rows = _rows(batch, dataset, pad_id=EOS)
    _assert_completion_only_labels(rows)
    assert tiny_tokenizer.pad_token_id == PAD  # the shared fixture was not touched


def test_trl_batch_train_on_inputs(tiny_model_dir, tiny_tokenizer, tmp_path):
    dataset, _ = tokenize_records(TRL_RECORDS, TEMPLATE, tiny_tokenizer, max_length=TRL_MAX_LENGTH,
                                      truncation="cut_eos")
    batch = _first_batch(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, completion_only_loss=False)
    for ids, labels, _ in _rows(batch, dataset, pad_id=PAD):
        assert labels == ids
        assert labels[-1] == EOS
