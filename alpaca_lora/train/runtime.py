"""What a training configuration becomes on this machine: the ``Runtime`` (device, compute dtype, optimizer,
world size, FSDP), and the Hugging Face objects' arguments that do the work (``sft_kwargs`` for SFTConfig,
``base_quantization`` for bitsandbytes, ``lora_kwargs`` for peft), with the resolved plan a dry run prints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.model_args import (
    compute_dtype,
    describe_quantization,
    quantization_config,
    resolve_device,
)
from alpaca_lora.train import launcher
from alpaca_lora.train.config import TrainConfig


@dataclass
class Runtime:
    """What the machine changes about a recipe, decided once and reported in one line."""

    device: str
    compute_dtype: str
    optim: str
    bf16: bool
    notes: list[str]
    world_size: int = 1
    fsdp: str = ""

    def gradient_accumulation_steps(self, cfg: TrainConfig) -> int:
        return cfg.batch_size // (cfg.micro_batch_size * self.world_size)


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    import torch

    device = resolve_device(cfg.device)
    world = launcher.planned_world_size(cfg.nproc, cfg.device)
    if device == "cuda" and not cfg.dry_run and not torch.cuda.is_available():
        raise ConfigError("key 'device' is cuda but no CUDA GPU is visible")
    dtype = compute_dtype(cfg, device)
    if device == "cuda":
        return Runtime(device, dtype, cfg.optim, dtype == "bfloat16", [], world, cfg.fsdp or "")
    # Paged optimizers page GPU memory; on CPU the plain torch AdamW is the equivalent.
    optim = "adamw_torch" if cfg.optim.startswith("paged_adamw") else cfg.optim.replace("paged_", "")
    notes = ["float32 compute", "bf16 off"]
    if optim != cfg.optim:
        notes.append(f"optimizer {optim} instead of {cfg.optim}")
    if cfg.fsdp:  # transformers/accelerate would quietly run DDP anyway: say so and ask for it
        notes.append("no FSDP sharding (it needs GPUs): several CPU ranks run data-parallel (DDP over gloo)")
    return Runtime("cpu", dtype, optim, False, notes, world)


def checkpointing(cfg: TrainConfig) -> bool:
    """Gradient checkpointing on or off; ``auto`` not yet decided by the memory plan (``plan.plan_run``)
    counts as on, the choice that cannot run out of memory for it."""
    return cfg.gradient_checkpointing is not False


def sft_kwargs(cfg: TrainConfig, runtime: Runtime, has_eval: bool) -> dict[str, Any]:
    """The SFTConfig this run uses, by Hugging Face field names (dry_run prints exactly this)."""
    kwargs = dict(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=runtime.gradient_accumulation_steps(cfg),
        max_length=cfg.max_length,
        completion_only_loss=not cfg.train_on_inputs,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=runtime.optim,
        bf16=runtime.bf16,
        use_cpu=runtime.device == "cpu",
        gradient_checkpointing=checkpointing(cfg),
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
        packing=cfg.packing,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=list(cfg.report_to),
        seed=cfg.seed,
        tf32=cfg.tf32 if runtime.device == "cuda" else None,
    )
    if runtime.fsdp:
        kwargs.update(fsdp=runtime.fsdp, fsdp_config=dict(cfg.fsdp_config))
    if checkpointing(cfg) and runtime.fsdp:  # re-entrant checkpointing is what FSDP wraps correctly
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    kwargs.update(cfg.sft)
    return kwargs


def preference_kwargs(cfg: TrainConfig, runtime: Runtime, has_eval: bool) -> dict[str, Any]:
    """The DPOConfig / KTOConfig of a preference run: SFT's training arguments less what only SFT has (packing,
    prompt masking: the preference loss is on answers alone), with beta, the loss and KTO's weights. DPO samples
    pairs at random (TRL cannot group pairs by length); KTO reads its rows in order, as its KL estimate within a
    micro batch requires (the data is shuffled once, with the seed, before)."""
    kwargs = sft_kwargs(cfg, runtime, has_eval)
    for name in ("completion_only_loss", "packing", *cfg.sft):
        kwargs.pop(name, None)
    settings = cfg.preference
    kwargs.update(beta=settings.beta, train_sampling_strategy="random" if cfg.method == "dpo" else "sequential")
    if settings.loss_type:
        kwargs["loss_type"] = [settings.loss_type] if cfg.method == "dpo" else settings.loss_type
    if cfg.method == "kto":
        kwargs.update(desirable_weight=settings.desirable_weight, undesirable_weight=settings.undesirable_weight)
    kwargs.update(settings.trl)
    return kwargs


def trainer_kwargs(cfg: TrainConfig, runtime: Runtime, has_eval: bool) -> tuple[str, dict[str, Any]]:
    """The name of this run's TRL config (SFTConfig, DPOConfig, KTOConfig) and its arguments."""
    if cfg.preference_tuning:
        return f"{cfg.method.upper()}Config", preference_kwargs(cfg, runtime, has_eval)
    return "SFTConfig", sft_kwargs(cfg, runtime, has_eval)


def base_quantization(cfg: TrainConfig, runtime: Runtime):
    """The base's BitsAndBytesConfig for this run (None for a 16-bit base)."""
    return quantization_config(cfg, runtime.device, sharded=bool(runtime.fsdp))


def lora_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    targets = cfg.lora.target_modules
    return {
        "r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": targets[0] if targets == ["all-linear"] else list(targets),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def resolved_plan(cfg: TrainConfig, runtime: Runtime, has_eval: bool) -> dict:
    """The whole plan: our keys, and what they become in TRL's config (``sft_config``; ``dpo_config`` or
    ``kto_config`` for preference tuning), bitsandbytes and peft (a preference run's adapter is the SFT one)."""
    _, trainer = trainer_kwargs(cfg, runtime, has_eval)
    plan = {
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "runtime": {"device": runtime.device, "world_size": runtime.world_size,
                    "micro_batch_size": cfg.micro_batch_size,
                    "gradient_accumulation_steps": runtime.gradient_accumulation_steps(cfg),
                    "global_batch_size": cfg.batch_size, "adaptations": runtime.notes},
        f"{cfg.method}_config": trainer,
        "quantization": describe_quantization(base_quantization(cfg, runtime)),
        "lora": lora_kwargs(cfg) if cfg.finetune == "lora" else None,
    }
    if cfg.preference_tuning:
        plan["lora"] = {"adapter": cfg.adapter, **plan["lora"]}
    if runtime.fsdp:  # auto_wrap wraps the model's own decoder layer class (its _no_split_modules)
        from alpaca_lora.train.architectures import find_architecture

        architecture = find_architecture(cfg.model)
        wrapped = architecture.layer_class if architecture else "the model's decoder layer"
        plan["runtime"]["fsdp_wrapped_layer"] = wrapped
    return plan


def resolved_yaml(cfg: TrainConfig, runtime: Runtime, has_eval: bool) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(resolved_plan(cfg, runtime, has_eval)))


