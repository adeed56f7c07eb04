"""The LM head only at target positions (alpaca_lora.train.trainer.TargetLossSFTTrainer) gives the loss and
the gradients of the full computation, on padded and on packed batches, in training and evaluation."""

from __future__ import annotations

import pytest
import torch

from alpaca_lora.data.builtin import skills
from alpaca_lora.data.examples import tokenize_records
from alpaca_lora.data.templates import get_template
from alpaca_lora.train.trainer import TargetLossSFTTrainer

MAX_LENGTH = 160
RECORDS = skills(12, seed=5)


def _peft_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # Random B (init_lora_weights=False): the adapters change the output, so A and B both get gradients.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _trainers(model_dir, tokenizer, tmp_path, packing, token_metrics=False):
    """TRL's SFTTrainer and ours on one shared model, with the same data, collator and settings."""
    import trl

    dataset, _ = tokenize_records(RECORDS, get_template("alpaca"), tokenizer, MAX_LENGTH)
    model = _peft_model(model_dir)
    model.train()
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                         max_length=MAX_LENGTH, packing=packing, completion_only_loss=True, report_to=[],
                         use_cpu=True)
    common = dict(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
    return trl.SFTTrainer(**common), TargetLossSFTTrainer(**common, token_metrics=token_metrics), model


def _loss_and_grads(trainer, model, batch, num_items_in_batch):
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def _full_reference(model, batch, num_items_in_batch):
    """transformers' own causal-LM loss over the full logits of every position."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    output = model(**inputs, labels=batch["labels"], use_cache=False, num_items_in_batch=num_items_in_batch)
    assert output.logits.shape[:2] == batch["input_ids"].shape  # really every position
    output.loss.backward()
    return output.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("num_items", [None, 57], ids=["batch-mean", "accumulated"])
def test_loss_and_gradients_equal_the_full_computation(tiny_model_dir, tiny_tokenizer, tmp_path, packing, num_items):
    trl_trainer, ours, model = _trainers(tiny_model_dir, tiny_tokenizer, tmp_path, packing)
    batch = next(iter(ours.get_train_dataloader()))
    assert ("attention_mask" in batch) != packing
    labels = batch["labels"]
    targets = int((labels[:, 1:] != -100).sum())
    assert 0 < targets < labels.numel() // 4  # most positions are prompt (or padding): the head skips them
    loss, grads = _loss_and_grads(ours, model, batch, num_items)
    full_loss, full_grads = _full_reference(model, batch, num_items)
    trl_loss, trl_grads = _loss_and_grads(trl_trainer, model, batch, num_items)
    torch.testing.assert_close(loss, full_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(grads[name], trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert loss > 0 and any(g.abs().sum() > 0 for g in grads.values())


def test_head_runs_only_at_targets(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The LM head sees exactly one row per trained label, not one per position."""
    _, ours, model = _trainers(tiny_model_dir, tiny_tokenizer, tmp_path, packing=True)
    batch = next(iter(ours.get_train_dataloader()))
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    try:
        ours.compute_loss(model, dict(batch))
    finally:
        hook.remove()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [torch.Size([targets, model.config.hidden_size])]


def test_logging_only_metrics_skipped_unless_asked(tiny_model_dir, tiny_tokenizer, tmp_path):
    trl_trainer, ours, model = _trainers(tiny_model_dir, tiny_tokenizer, tmp_path, packing=True)
    rows = [ours.train_dataset[i] for i in range(3)]
    batch = ours.data_collator(rows)  # packed rows of unequal length: the shorter ones padded
    assert len({len(row["input_ids"]) for row in rows}) > 1 and "attention_mask" not in batch
    with torch.no_grad():
        ours.compute_loss(model, dict(batch))
        trl_trainer.compute_loss(model, dict(batch))
    assert "entropy" not in ours._metrics["train"] and "mean_token_accuracy" not in ours._metrics["train"]
    assert ours._metrics["train"]["num_tokens"] == [sum(len(row["input_ids"]) for row in rows)]  # padding not counted

    _, asked, model = _trainers(tiny_model_dir, tiny_tokenizer, tmp_path / "asked", packing=True, token_metrics=True)
    with torch.no_grad():
        asked.compute_loss(model, dict(batch))
    for key in ("entropy", "mean_token_accuracy"):  # the same figures TRL logs
        assert asked._metrics["train"][key] == pytest.approx(trl_trainer._metrics["train"][key], rel=1e-4, abs=1e-6)


def test_evaluation_loss_equals_trl(tiny_model_dir, tiny_tokenizer, tmp_path):
    trl_trainer, ours, model = _trainers(tiny_model_dir, tiny_tokenizer, tmp_path, packing=False)
    ours_eval = ours.evaluate()["eval_loss"]
    trl_eval = trl_trainer.evaluate()["eval_loss"]
    assert ours_eval == pytest.approx(trl_eval, rel=1e-5)
