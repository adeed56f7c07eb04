"""Packing through TRL (best-fit decreasing, padding-free) is exact: every sequence of a packed batch
gets the logits and the loss it gets alone, with the prompt masked and its EOS label kept; for conversations,
every answer's tokens and its EOS are the labels, and nothing else.

The batches are TRL's own (SFTTrainer's dataset preparation, BFD packing and collator) built from
our tokenized examples; the model is the tiny random Llama, in float32 on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from alpaca_lora.data.builtin import skills
from alpaca_lora.data.examples import tokenize_records
from alpaca_lora.data.templates import get_template, record_message
from alpaca_lora.train.packing import batch_plan

TEMPLATE = get_template("alpaca")
MAX_LENGTH = 160  # room for one long example or two or three short ones per packed row
LONG = {"instruction": "Repeat the words.", "input": "",
        "output": " ".join(["apple river stone cloud garden window silver orange"] * 3)}
RECORDS = skills(14, seed=3) + [LONG]


def _conversations(records: list[dict], sizes: list[int]) -> list[dict]:
    """The records as conversations of ``sizes`` turns each, every other one with a system message."""
    conversations, start = [], 0
    for number, size in enumerate(sizes):
        messages = [{"role": "system", "content": "Answer exactly."}] if number % 2 else []
        for record in records[start:start + size]:
            messages += [{"role": "user", "content": record_message(record["instruction"], record["input"])},
                         {"role": "assistant", "content": record["output"]}]
        conversations.append({"messages": messages})
        start += size
    return conversations


CONVERSATIONS = _conversations(RECORDS, [3, 1, 2, 1, 1, 1, 3, 2, 1])


def _trainer(model_dir, tokenizer, dataset, tmp_path, attn, packing=True, micro_batch=3, **settings):
    import trl
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    assert model.config._attn_implementation == attn
    model.eval()  # no dropout: logits are compared exactly
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=micro_batch,
                         max_length=MAX_LENGTH, packing=packing, completion_only_loss=True, report_to=[],
                         use_cpu=True, **settings)
    return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def _segments(batch):
    """(start, end) of every sequence in the one padding-free row, from TRL's position ids."""
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
    return list(zip(starts[:-1], starts[1:]))


def _expected_labels(example):
    return [t if m else -100 for t, m in zip(example["input_ids"], example["completion_mask"])]


@pytest.fixture(params=["alpaca", pytest.param("conversations", marks=pytest.mark.slow)])
def dataset(request, tiny_tokenizer):
    """The records as examples, one each, or as conversations in turns, one example each (all fit)."""
    records = RECORDS if request.param == "alpaca" else CONVERSATIONS
    data, stats = tokenize_records(records, TEMPLATE, tiny_tokenizer, max_length=MAX_LENGTH,
                                   multi_turn=request.param == "conversations")
    assert stats["dropped"] == stats["truncated"] == stats["restarted"] == 0 and len(data) == len(records)
    assert len(data) == 15 or sum(ids.count(tiny_tokenizer.eos_token_id) for ids in data["input_ids"]) == 15
    return data


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_match_each_sequence_alone(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, attn):
    trainer = _trainer(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, attn)
    model, eos = trainer.model, tiny_tokenizer.eos_token_id
    assert trainer.padding_free  # bfd packing turns on TRL's padding-free collator
    by_ids = {tuple(ex["input_ids"]): ex for ex in dataset}
    seen, shared_rows = [], 0
    for batch in trainer.get_train_dataloader():
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # one row, no padding
        assert batch["input_ids"].shape[1] <= 3 * MAX_LENGTH
        model_inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            packed = model(**model_inputs, use_cache=False).logits[0]
        segments = _segments(batch)
        shared_rows += len(segments) > 1
        for start, end in segments:
            ids = batch["input_ids"][0, start:end]
            example = by_ids[tuple(ids.tolist())]  # every segment is one whole example, unchanged
            seen.append(tuple(ids.tolist()))
            labels = batch["labels"][0, start:end]
            assert labels.tolist() == _expected_labels(example)  # the prompt masked, the completion kept
            assert labels[-1].item() == eos == ids[-1].item()  # ... up to and including its EOS
            with torch.no_grad():
                alone = model(input_ids=ids[None], use_cache=False, labels=labels[None])
            torch.testing.assert_close(packed[start:end], alone.logits[0], atol=2e-5, rtol=1e-4)
            packed_loss = F.cross_entropy(packed[start:end - 1], labels[1:], ignore_index=-100)
            torch.testing.assert_close(packed_loss, alone.loss, atol=1e-5, rtol=1e-5)
    assert sorted(seen) == sorted(by_ids)  # every example exactly once over the epoch
    assert shared_rows >= 2  # packing really put several sequences into one row


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_match_each_sequence_alone(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, attn):
    """Our layout for mask-based kernels (PackedRowsCollator): packed rows stay rows of at most max_length tokens,
    padded to the longest; every sequence of every row gets the logits and loss it gets alone."""
    from alpaca_lora.train.trainer import PackedRowsCollator, real_tokens

    trainer = _trainer(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, attn)
    model, eos = trainer.model, tiny_tokenizer.eos_token_id
    collator = PackedRowsCollator(tiny_tokenizer.pad_token_id)
    rows = list(trainer.train_dataset)
    by_ids = {tuple(ex["input_ids"]): ex for ex in dataset}
    seen, padded_rows = [], 0
    for first in range(0, len(rows), 3):
        batch = collator(rows[first:first + 3])
        assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= MAX_LENGTH
        assert int(real_tokens(batch)) == sum(len(r["input_ids"]) for r in rows[first:first + 3])
        with torch.no_grad():
            packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for i, row in enumerate(rows[first:first + 3]):
            start = 0
            for length in row["seq_lengths"]:
                end = start + length
                ids, labels = batch["input_ids"][i, start:end], batch["labels"][i, start:end]
                example = by_ids[tuple(ids.tolist())]
                seen.append(tuple(ids.tolist()))
                assert labels.tolist() == [-100] + _expected_labels(example)[1:]
                assert labels[-1].item() == eos == ids[-1].item()
                with torch.no_grad():
                    alone = model(input_ids=ids[None], use_cache=False, labels=labels[None])
                torch.testing.assert_close(packed[i, start:end], alone.logits[0], atol=2e-5, rtol=1e-4)
                packed_loss = F.cross_entropy(packed[i, start:end - 1], labels[1:], ignore_index=-100)
                torch.testing.assert_close(packed_loss, alone.loss, atol=1e-5, rtol=1e-5)
                start = end
            padding = batch["labels"][i, start:]
            padded_rows += padding.numel() > 0
            assert (padding == -100).all() and (batch["input_ids"][i, start:] == tiny_tokenizer.pad_token_id).all()
    assert sorted(seen) == sorted(by_ids) and padded_rows >= 1


def test_packed_row_without_boundaries_mixes_sequences(tiny_model_dir, tiny_tokenizer, dataset, tmp_path):
    """The check above can fail: the same row run as one sequence (positions 0..T-1) gives other logits."""
    trainer = _trainer(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, "sdpa")
    batch = next(b for b in trainer.get_train_dataloader() if len(_segments(b)) > 1)
    start, end = _segments(batch)[1]
    ids = batch["input_ids"]
    with torch.no_grad():
        mixed = trainer.model(input_ids=ids, use_cache=False).logits[0, start:end]
        alone = trainer.model(input_ids=ids[:, start:end], use_cache=False).logits[0]
    assert (mixed - alone).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_loss_is_the_token_mean_of_the_sequences(tiny_model_dir, tiny_tokenizer, dataset, tmp_path,
                                                               attn):
    """TRL's own training loss on a packed batch equals the padded, unpacked computation."""
    trainer = _trainer(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, attn)
    model = trainer.model
    batch = next(b for b in trainer.get_train_dataloader() if len(_segments(b)) > 1)
    total, count = 0.0, 0
    for start, end in _segments(batch):
        labels = batch["labels"][0, start:end]
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits[0]
        total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
        count += int((labels[1:] != -100).sum())
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recipe, packed", [("qlora", True), ("lora", True), ("demo", True), ("qlora_fsdp", True),
                                            ("lora_8bit", False), ("full_fsdp", False), ("full_fsdp_13b", False)])
def test_packing_on_except_in_published_reproductions(recipe, packed):
    from alpaca_lora.train.config import load_config
    from alpaca_lora.train.runtime import resolve_runtime, sft_kwargs

    cfg = load_config([f"recipe={recipe}", "device=cpu"])
    sft = sft_kwargs(cfg, resolve_runtime(cfg), has_eval=False)
    assert cfg.packing is packed and sft["packing"] is packed
    if packed:
        assert sft["train_sampling_strategy"] == "random"
    overridden = load_config([f"recipe={recipe}", "device=cpu", f"packing={str(not packed).lower()}"])
    assert overridden.packing is not packed  # the key turns it either way


@pytest.mark.parametrize("packing", [True, False])
def test_batch_plan_is_what_the_trainer_does(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, packing):
    """Rows, tokens, micro batches and optimizer steps per epoch, computed from the lengths alone."""
    trainer = _trainer(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, "sdpa", packing=packing, micro_batch=2,
                       gradient_accumulation_steps=2, num_train_epochs=1, save_strategy="no", logging_steps=100)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    plan = batch_plan(lengths, MAX_LENGTH, micro_batch_size=2, gradient_accumulation_steps=2, packing=packing)
    loader = trainer.get_train_dataloader()
    assert plan.rows == len(trainer.train_dataset) and (plan.rows < len(dataset)) == packing
    assert plan.micro_batches_per_epoch == len(loader)
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in loader)
    assert plan.tokens == real == sum(lengths)
    assert plan.unpacked_steps_per_epoch == (4 if len(dataset) == 15 else 3)  # 15 or 9 examples, 2 per micro batch,
    # 2 micro batches per step
    assert plan.examples == len(dataset)  # a conversation is one example, counted at its real length
    trainer.train()
    assert trainer.state.global_step == plan.steps_per_epoch
    if packing:
        assert plan.steps_per_epoch < plan.unpacked_steps_per_epoch
        assert max(b["input_ids"].shape[1] for b in loader) <= plan.micro_batch_size * MAX_LENGTH
        assert "packing:" in plan.lines()[0] and "optimizer steps per epoch" in plan.lines()[-1]


def test_memory_plan_counts_packed_micro_batches_as_full():
    from dataclasses import replace

    from alpaca_lora.train.architectures import ARCHITECTURES
    from alpaca_lora.train.config import load_config
    from alpaca_lora.train.plan import Setup, estimate

    a = ARCHITECTURES["llama-2-7b"]
    setup = replace(Setup.from_config(load_config(["model=llama-2-7b"]), gpus=1), micro_batch=4, seq_len=512)
    padded, packed = estimate(a, replace(setup, packing=False)), estimate(a, replace(setup, packing=True))
    rows = dict(packed.rows)
    activations = next(label for label in rows if label.startswith("activations"))
    assert "4 packed rows x 512 tokens" in activations
    assert rows[activations] == dict(padded.rows)[next(k for k in dict(padded.rows) if k.startswith("activations"))]
    assert packed.total - padded.total == 4 * 512 * 512  # the block-diagonal masks of the 4 rows (SDPA)


def test_attention_selection_on_cpu_is_sdpa_and_said(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from alpaca_lora.train.trainer import attention_implementation, select_attention

    assert attention_implementation("cpu")[0] == "sdpa"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert "SDPA" in select_attention(model, "cpu", packing=True)
    assert model.config._attn_implementation == "sdpa"


def test_packing_refuses_an_attention_kernel_not_proven_exact():
    from types import SimpleNamespace

    from alpaca_lora.common.settings import ConfigError
    from alpaca_lora.train.trainer import select_attention

    class OwnKernelOnly:  # a model that cannot switch to SDPA and keeps an unproven kernel
        config = SimpleNamespace(_attn_implementation="flex_attention")

        def set_attn_implementation(self, name):
            raise ValueError(f"{name} is not supported")

    with pytest.raises(ConfigError, match="key 'packing'.*flex_attention.*packing=false"):
        select_attention(OwnKernelOnly(), "cpu", packing=True)
    assert "flex_attention" in select_attention(OwnKernelOnly(), "cpu", packing=False)


def test_dry_run_says_what_packing_does_to_the_batches(tiny_model_dir, tmp_path, capsys):
    from alpaca_lora.train.run import main

    data = tmp_path / "data.json"
    data.write_text(json.dumps(skills(40, seed=3)))
    main([f"model={tiny_model_dir}", f"data={data}", "device=cpu", "max_length=256", "batch_size=4",
          "micro_batch_size=2", "val_set_size=0", "dry_run=true"])
    err = capsys.readouterr().err
    assert "packing: 40 examples into" in err and "optimizer steps per epoch" in err and "(without packing: 10)" in err
    main([f"model={tiny_model_dir}", f"data={data}", "device=cpu", "max_length=256", "batch_size=4",
          "micro_batch_size=2", "val_set_size=0", "packing=false", "dry_run=true"])
    assert "no packing: 40 examples" in capsys.readouterr().err


def test_dry_run_plans_the_batches_of_a_conversation_file(tiny_model_dir, tmp_path, capsys):
    """A conversations file: one example per conversation, at its whole length, as training will have them."""
    from alpaca_lora.train.run import main

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(conversation) + "\n" for conversation in CONVERSATIONS))
    main([f"model={tiny_model_dir}", f"data={data}", "device=cpu", f"max_length={MAX_LENGTH}", "batch_size=4",
          "micro_batch_size=2", "val_set_size=0", "dry_run=true"])
    err = capsys.readouterr().err
    assert "packing: 9 examples into" in err and "(without packing: 3)" in err
    main([f"model={tiny_model_dir}", f"data={data}", "device=cpu", "max_length=100", "batch_size=4",
          "micro_batch_size=2", "val_set_size=0", "packing=false", "dry_run=true"])
    # at 100 tokens: five are cut (at a turn, or in their only answer), one whose first prompt is longer is dropped
    assert "no packing: 8 examples" in capsys.readouterr().err
