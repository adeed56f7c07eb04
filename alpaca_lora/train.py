"""Fine-tune a base model on Alpaca-format data: ``python -m alpaca_lora.train recipe=NAME key=value ...``.

Everything cheap and checkable (config, data, template, checkpoint path) is validated before the
model is loaded; TRL's SFTTrainer, peft and bitsandbytes do the training.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from alpaca_lora.config import (
    ConfigError, Runtime, TrainConfig, help_text, load_config, lora_kwargs, quantization_kwargs,
    resolve_runtime, resolved_yaml, sft_kwargs,
)
from alpaca_lora.data.examples import split_records, summarize, tokenize_records
from alpaca_lora.data.loading import load_records
from alpaca_lora.data.templates import get_template
from alpaca_lora.errors import UserError, exit_on_user_error
from alpaca_lora.paths import atomic_write_text


class AdapterError(UserError):
    pass


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict
    trainer: object


def log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[alpaca-lora] {message}", flush=True)


def find_checkpoint(cfg: TrainConfig) -> str | None:
    """``resume_from_checkpoint``: true means the newest checkpoint in ``output_dir``; else a path."""
    from transformers.trainer_utils import get_last_checkpoint

    value = cfg.resume_from_checkpoint
    if value is None or value.lower() in {"false", "none", ""}:
        return None
    if value.lower() in {"true", "latest"}:
        found = get_last_checkpoint(cfg.output_dir) if os.path.isdir(cfg.output_dir) else None
        if found is None:
            raise ConfigError(f"key 'resume_from_checkpoint' is true but {cfg.output_dir} holds no checkpoint-* yet")
        return found
    if not os.path.isdir(value):
        raise ConfigError(f"key 'resume_from_checkpoint': no checkpoint directory {value}")
    return value


def check_adapter(output_dir: Path) -> int:
    """Fails loudly when the saved adapter is empty or its LoRA B weights are all zero (nothing learned)."""
    from safetensors.torch import load_file

    path = output_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterError(f"{path} was not written")
    weights = load_file(path)
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    if not lora_b:
        raise AdapterError(f"{path} holds no LoRA B weights: the adapter is empty")
    if all(not t.any() for t in lora_b):
        raise AdapterError(f"{path}: every LoRA B weight is zero, so the adapter changes nothing")
    return sum(t.numel() for t in weights.values())


def under_launcher() -> bool:
    """Started by torchrun, accelerate launch or srun (one task per GPU): run as that rank."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        for ours, slurm in (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS"), ("LOCAL_RANK", "SLURM_LOCALID")):
            os.environ[ours] = os.environ[slurm]
        if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            raise ConfigError("srun started several tasks: export MASTER_ADDR and MASTER_PORT (see recipes/slurm/)")
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


def relaunch_if_needed(cfg: TrainConfig, runtime: Runtime, argv: list[str]) -> None:
    """On N > 1 GPUs (or ``nproc=N``) and not under a launcher, re-runs this command through
    ``torch.distributed.run`` with N processes and exits with its status; otherwise says why not."""
    import torch

    if under_launcher():
        return
    count = cfg.nproc or (torch.cuda.device_count() if runtime.device == "cuda" else 1)
    if count == 1:
        why = "nproc=1" if cfg.nproc else ("one GPU" if runtime.device == "cuda" else "no GPU (nproc=N starts N CPU ranks)")
        log(f"one process: {why}")
        return
    if cfg.batch_size % (cfg.micro_batch_size * count):
        raise ConfigError(f"key 'batch_size' ({cfg.batch_size}) must be a multiple of micro_batch_size x processes "
                          f"({cfg.micro_batch_size} x {count})")
    log(f"{count} processes: re-launching through torch.distributed.run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}",
               "-m", "alpaca_lora.train", *argv]
    raise SystemExit(subprocess.call(command))


def check_memory(cfg: TrainConfig, gpu_bytes: float) -> None:
    """Stops before any weight loads when the plan predicts out-of-memory (``force=true`` overrides)."""
    from alpaca_lora.plan import Setup, find_architecture, report

    architecture = find_architecture(resolve_model_config(cfg.model))
    if architecture is None:
        log(f"memory plan skipped: no config for {cfg.model} and not a built-in architecture")
        return
    text, fits = report(cfg.model, architecture, Setup.from_config(cfg, cfg.world_size), gpu_bytes, cfg.recipe)
    if fits:
        return
    if cfg.force:
        log("the memory plan predicts out-of-memory; going on because force=true\n" + text)
        return
    print(text, file=sys.stderr)
    raise ConfigError("the memory plan above predicts out-of-memory on this GPU: lower micro_batch_size or "
                      "max_length, turn on gradient_checkpointing, use more GPUs, or set force=true")


def resolve_model_config(spec: str) -> str:
    """A local config.json for ``spec`` when one is at hand (a directory, or a cached hub model), else ``spec``."""
    if Path(spec).is_dir():
        return spec
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
        return cached if isinstance(cached, str) else spec
    except Exception:  # not a hub id
        return spec


def load_callbacks(paths: list[str]) -> list:
    callbacks = []
    for path in paths:
        module, _, name = path.partition(":")
        try:
            callbacks.append(getattr(importlib.import_module(module), name)())
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"key 'callbacks': cannot load {path} ({exc})") from None
    return callbacks


def train(cfg: TrainConfig, runtime: Runtime, callbacks: list | None = None) -> TrainResult:
    """The whole run; ``callbacks`` are transformers ``TrainerCallback``s (progress hooks, tests)."""
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from alpaca_lora.evaluate.exact_match import exact_match
    from alpaca_lora.model import load_model, load_tokenizer, resolve_model, train_adapters_in_float32
    from alpaca_lora.plots import plot_loss

    output_dir = Path(cfg.output_dir)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if runtime.device == "cuda" and cfg.world_size > 1:
        torch.cuda.set_device(local_rank)  # each rank its own GPU (and its own quantized copy without FSDP)
    callbacks = list(callbacks or []) + load_callbacks(cfg.callbacks)
    template = get_template(cfg.template)
    data = load_records(cfg.data, cfg.columns)
    train_records, val_records = split_records(data.records, cfg.val_set_size, cfg.seed)
    checkpoint = find_checkpoint(cfg)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    train_set, stats = tokenize_records(train_records, template, tokenizer, cfg.max_length)
    val_set, val_stats = tokenize_records(val_records, template, tokenizer, cfg.max_length)
    summary = summarize(data.records, {k: stats[k] + val_stats[k] for k in stats}, data.duplicates_dropped,
                        cfg.max_length)
    log(f"data: {data.source}: " + "; ".join(summary.lines()))
    log(f"split: {len(train_set)} train, {len(val_set)} validation examples")
    has_eval = len(val_set) > 0
    if runtime.notes:
        log(f"no GPU: training on CPU with {', '.join(runtime.notes)}")
    if rank == 0:
        atomic_write_text(output_dir / "config.yaml", resolved_yaml(cfg, runtime, has_eval))
    if cfg.world_size > 1:
        print(f"[alpaca-lora] rank {rank} of {cfg.world_size}: global batch {cfg.batch_size} = micro batch "
              f"{cfg.micro_batch_size} x accumulation {cfg.gradient_accumulation_steps} x {cfg.world_size} ranks",
              flush=True)

    try:  # SFTConfig checks its own fields: do it before the expensive part
        args = SFTConfig(**sft_kwargs(cfg, runtime, has_eval))
    except ValueError as exc:
        raise ConfigError(f"invalid training settings: {str(exc).splitlines()[0]}") from None
    if runtime.device == "cuda":
        check_memory(cfg, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    quantization = quantization_kwargs(cfg, runtime)
    full = cfg.finetune == "full"
    load_dtype = "float32" if full else runtime.compute_dtype  # full fine-tuning keeps fp32 master weights
    if quantization and cfg.quant.quant_storage and runtime.fsdp:
        load_dtype = cfg.quant.quant_storage  # the non-quantized weights match the packed ones, so FSDP shards all
    model = load_model(model_path, quantization, load_dtype, runtime.device, cfg.trust_remote_code,
                       sharded=bool(runtime.fsdp))
    if quantization and not runtime.fsdp:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    scored = val_records[: cfg.exact_match_eval]
    before = exact_match(model, tokenizer, template, scored, "before training") if scored else None

    torch.manual_seed(cfg.seed)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set if has_eval else None,
        processing_class=tokenizer,
        peft_config=None if full else LoraConfig(**lora_kwargs(cfg)),
        callbacks=callbacks,
    )
    if runtime.compute_dtype == "float32" and not full:
        train_adapters_in_float32(trainer.model)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    after = exact_match(trainer.model, tokenizer, template, scored, "after training") if scored else None

    metrics = {"train": result.metrics, "data": summary.to_dict(), "log_history": trainer.state.log_history}
    if has_eval:
        evals = [e for e in trainer.state.log_history if "eval_loss" in e]
        final_is_logged = evals and evals[-1]["step"] == trainer.state.global_step
        metrics["eval"] = evals[-1] if final_is_logged else trainer.evaluate()
    if scored:
        metrics["exact_match"] = {"examples": len(scored), "before": before.accuracy, "after": after.accuracy}
    if trainer.is_fsdp_enabled:  # sharded checkpoints while training; one consolidated model at the end
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(output_dir))  # every rank takes part in gathering; only rank 0 writes
    if trainer.is_world_process_zero():
        if full:
            metrics["parameters"] = sum(p.numel() for p in trainer.model.parameters())
        else:
            metrics["adapter_parameters"] = check_adapter(output_dir)
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2))
        plot_loss(trainer.state.log_history, output_dir / "loss.png", title=f"{cfg.recipe}: {cfg.model}")
        if scored:
            report_exact_match(scored, before, after)
        weights = f"model: {output_dir} (safetensors + tokenizer)" if full else \
            f"adapter: {output_dir / 'adapter_model.safetensors'}"
        log(f"{weights}; loss curve: {output_dir / 'loss.png'}; metrics: {output_dir / 'metrics.json'}")
    return TrainResult(output_dir, metrics, trainer)


def report_exact_match(records, before, after, samples: int = 5) -> None:
    print(f"\n{'exact match on ' + str(len(records)) + ' held-out examples':<44}{'before':>10}{'after':>10}")
    print(f"{'accuracy':<44}{before.accuracy:>10.1%}{after.accuracy:>10.1%}")
    print(f"{'correct':<44}{before.correct:>10}{after.correct:>10}\n")
    rows = list(zip(records, before.responses, after.responses, after.matches))
    right = [row[:3] for row in rows if row[3]]
    wrong = [row[:3] for row in rows if not row[3]]
    for record, old, new in right[: samples - min(2, len(wrong))] + wrong[:2]:  # some of each
        prompt = record["instruction"] + (f" | {record['input']}" if record["input"] else "")
        print(f"  {prompt}\n    expected: {record['output']!r}\n    before:   {old[:80]!r}\n    after:    {new[:80]!r}")
    print()


def main(argv: list[str] | None = None) -> TrainResult | None:
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        print(help_text())
        return None
    with exit_on_user_error():
        cfg = load_config(args)
        runtime = resolve_runtime(cfg)
        if cfg.dry_run:
            print(resolved_yaml(cfg, runtime, has_eval=cfg.val_set_size > 0), end="")
            return None
        relaunch_if_needed(cfg, runtime, args)
        return train(cfg, runtime)


if __name__ == "__main__":
    main()
