"""Training configuration: a recipe (YAML) plus ``key=value`` overrides, merged by OmegaConf into
typed dataclasses, then translated into the Hugging Face objects (SFTConfig, BitsAndBytesConfig,
LoraConfig) that do the work.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf

from alpaca_lora.errors import UserError
from alpaca_lora.settings import ConfigError, build, key_lines, parse_overrides
from alpaca_lora.settings import key as _key

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "qlora"


@dataclass
class LoraSettings:
    r: int = _key(64, "LoRA rank")
    alpha: int = _key(16, "LoRA alpha (scaling is alpha / r)")
    dropout: float = _key(0.05, "dropout on the LoRA path")
    target_modules: List[str] = _key(["all-linear"], "modules to adapt; 'all-linear' means every linear layer")


@dataclass
class QuantSettings:
    bits: int = _key(4, "storage precision of the frozen base: 4 (NF4/FP4), 8 (LLM.int8) or 16 (no quantization)")
    quant_type: str = _key("nf4", "4-bit data type: nf4 or fp4")
    double_quant: bool = _key(True, "also quantize the 4-bit quantization constants (QLoRA double quantization)")
    compute_dtype: str = _key("bfloat16", "dtype of the matmuls and of a 16-bit base on GPU (float32 on CPU)")
    quant_storage: Optional[str] = _key(None, "dtype the 4-bit weights are packed in (bfloat16 lets FSDP shard "
                                              "them with the rest; default uint8)")


@dataclass
class TrainConfig:
    recipe: str = _key(DEFAULT_RECIPE, "recipe name in recipes/ or a path to a YAML file")
    finetune: str = _key("lora", "lora (adapters on a frozen base) or full (every parameter, no adapters)")
    model: str = _key(MISSING, "base model: hub id, local directory, .gguf file, or package:MODULE/FILE.gguf")
    data: str = _key("tatsu-lab/alpaca", "data: .json/.jsonl file, http(s) URL, hub dataset id, or builtin:NAME")
    columns: Dict[str, str] = _key({}, "map our fields to the data's, e.g. columns.output=response")
    template: str = _key("alpaca", "prompt template: alpaca, alpaca_lora, or a .json/.yaml template file")
    output_dir: str = _key("outputs/qlora", "where the adapter, checkpoints, config.yaml, metrics.json, loss.png go")
    max_steps: int = _key(-1, "stop after this many optimizer steps (-1: run num_epochs)")
    num_epochs: float = _key(3.0, "passes over the training split")
    learning_rate: float = _key(2e-4, "peak learning rate")
    batch_size: int = _key(16, "global batch size (sequences per optimizer step, all devices together)")
    micro_batch_size: int = _key(4, "sequences per device per forward pass")
    max_length: int = _key(512, "maximum tokens per example; longer responses are cut and still end with EOS")
    train_on_inputs: bool = _key(False, "also train on the prompt (alpaca-lora's default); false masks it (Stanford)")
    val_set_size: float = _key(0.0, "validation split: a fraction (<1) or a number of rows (>=1); 0 for none")
    seed: int = _key(42, "seed for the split, shuffling and LoRA initialisation")
    resume_from_checkpoint: Optional[str] = _key(None, "true: newest checkpoint in output_dir; or a checkpoint path")
    dry_run: bool = _key(False, "print the resolved configuration (with the derived SFTConfig) and exit")
    device: str = _key("auto", "auto, cuda or cpu (cpu trains in float32 without paged optimizers)")
    trust_remote_code: bool = _key(False, "allow the model repository's own Python code to run")
    optim: str = _key("paged_adamw_32bit", "optimizer name as transformers knows it")
    lr_scheduler: str = _key("constant", "learning-rate schedule (transformers' lr_scheduler_type)")
    warmup: float = _key(0.03, "learning-rate warmup: a fraction of the steps (<1) or a number of steps (>=1)")
    weight_decay: float = _key(0.0, "AdamW weight decay")
    max_grad_norm: float = _key(0.3, "gradient clipping norm")
    gradient_checkpointing: bool = _key(True, "recompute activations in the backward pass to save memory")
    group_by_length: bool = _key(True, "batch examples of similar length together (less padding, faster)")
    logging_steps: int = _key(10, "log the training loss every N steps")
    eval_steps: int = _key(200, "evaluate on the validation split every N steps")
    save_steps: int = _key(200, "write a resumable checkpoint every N steps")
    save_total_limit: int = _key(3, "checkpoints kept in output_dir")
    report_to: List[str] = _key(["tensorboard"], "loggers: tensorboard, wandb (W&B reads WANDB_* variables)")
    exact_match_eval: int = _key(0, "score exact-match accuracy on N validation rows before and after training")
    fsdp: Optional[str] = _key("", "FSDP sharding for multi-GPU runs, as transformers spells it (empty for none)")
    fsdp_config: Dict[str, Any] = _key({}, "transformers' fsdp_config (the wrapped layer class defaults to the "
                                           "model's own decoder layer)")
    tf32: bool = _key(False, "allow TF32 matmuls on Ampere or newer GPUs")
    nproc: Optional[int] = _key(None, "processes to start when not under a launcher (default: one per visible GPU)")
    force: bool = _key(False, "train even when the memory plan predicts the GPU will run out")
    callbacks: List[str] = _key([], "extra transformers TrainerCallback classes, as module:Class import paths")
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA adapter settings"})
    quant: QuantSettings = field(default_factory=QuantSettings, metadata={"help": "quantization of the base"})
    sft: Dict[str, Any] = _key({}, "extra SFTConfig fields by their Hugging Face names, e.g. sft.logging_first_step=true")

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.world_size)


def recipe_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in {".yaml", ".yml"}:
        if not path.is_file():
            raise ConfigError(f"recipe file {name} not found")
        return path
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown recipe '{name}'; available: {', '.join(available)}")
    return path


def load_config(overrides: list[str]) -> TrainConfig:
    """Defaults <- recipe YAML <- ``key=value`` overrides, as a validated :class:`TrainConfig`."""
    dotlist = parse_overrides(overrides)
    recipe = str(dotlist.get("recipe") or DEFAULT_RECIPE)
    path = recipe_path(recipe)
    try:
        recipe_yaml = OmegaConf.load(path)
    except Exception as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    cfg: TrainConfig = build(TrainConfig, [(str(path), recipe_yaml), ("command line", dotlist)], "alpaca_lora.train")
    cfg.recipe = recipe
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks the meaning of values (types were checked by OmegaConf); each error names its key."""
    from alpaca_lora.data.templates import get_template

    checks = [
        (lambda: cfg.quant.bits in (4, 8, 16), "quant.bits", "must be 4, 8 or 16"),
        (lambda: cfg.quant.quant_type in ("nf4", "fp4"), "quant.quant_type", "must be nf4 or fp4"),
        (lambda: cfg.quant.compute_dtype in ("bfloat16", "float16", "float32"), "quant.compute_dtype",
         "must be bfloat16, float16 or float32"),
        (lambda: cfg.device in ("auto", "cuda", "cpu"), "device", "must be auto, cuda or cpu"),
        (lambda: cfg.micro_batch_size >= 1, "micro_batch_size", "must be at least 1"),
        (lambda: cfg.world_size >= 1, "WORLD_SIZE", "(environment) must be at least 1"),
        (lambda: cfg.batch_size % (cfg.micro_batch_size * cfg.world_size) == 0, "batch_size",
         f"must be a multiple of micro_batch_size x world size ({cfg.micro_batch_size} x {cfg.world_size})"),
        (lambda: cfg.max_length >= 8, "max_length", "must be at least 8"),
        (lambda: cfg.val_set_size >= 0, "val_set_size", "must be 0 or more"),
        (lambda: cfg.max_steps > 0 or cfg.num_epochs > 0, "num_epochs", "must be positive when max_steps is -1"),
        (lambda: cfg.learning_rate > 0, "learning_rate", "must be positive"),
        (lambda: cfg.warmup >= 0, "warmup", "must be 0 or more"),
        (lambda: cfg.lora.r >= 1, "lora.r", "must be at least 1"),
        (lambda: bool(cfg.lora.target_modules), "lora.target_modules", "must name at least one module"),
        (lambda: set(cfg.columns) <= {"instruction", "input", "output"}, "columns",
         "may only map instruction, input and output"),
        (lambda: cfg.exact_match_eval <= 0 or cfg.val_set_size > 0, "exact_match_eval",
         "needs a validation split (val_set_size)"),
        (lambda: cfg.finetune in ("lora", "full"), "finetune", "must be lora or full"),
        (lambda: cfg.finetune == "lora" or cfg.quant.bits == 16, "quant.bits",
         "must be 16 with finetune=full (quantized weights cannot be trained)"),
        (lambda: cfg.quant.quant_storage in (None, "uint8", "bfloat16", "float16", "float32"), "quant.quant_storage",
         "must be uint8, bfloat16, float16 or float32"),
        (lambda: cfg.nproc is None or cfg.nproc >= 1, "nproc", "must be at least 1"),
    ]
    for ok, key, message in checks:  # in order: later checks may rely on earlier ones
        if not ok():
            raise ConfigError(f"key '{key}' {message}")
    try:
        get_template(cfg.template)
    except UserError as exc:
        raise ConfigError(f"key 'template': {exc}") from None
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    for key in cfg.sft:
        if key not in known:
            raise ConfigError(f"key 'sft.{key}' is not an SFTConfig field")


def help_text() -> str:
    recipes = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    lines = [
        "usage: python -m alpaca_lora.train [recipe=NAME] [key=value ...]",
        f"recipes: {recipes} (default {DEFAULT_RECIPE}); a recipe sets its own values, dry_run=true shows them",
        "keys (dotted keys set nested ones, e.g. lora.r=16), with their built-in defaults:",
    ]
    return "\n".join(lines + key_lines(TrainConfig))


@dataclass
class Runtime:
    """What the machine changes about a recipe, decided once and reported in one line."""

    device: str
    compute_dtype: str
    optim: str
    bf16: bool
    notes: list[str]
    fsdp: str = ""


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not cfg.dry_run and not torch.cuda.is_available():
        raise ConfigError("key 'device' is cuda but no CUDA GPU is visible")
    if device == "cuda":
        bf16 = cfg.quant.compute_dtype == "bfloat16"
        return Runtime(device, cfg.quant.compute_dtype, cfg.optim, bf16, [], cfg.fsdp or "")
    # Paged optimizers page GPU memory; on CPU the plain torch AdamW is the equivalent.
    optim = "adamw_torch" if cfg.optim.startswith("paged_adamw") else cfg.optim.replace("paged_", "")
    notes = ["float32 compute", "bf16 off"]
    if optim != cfg.optim:
        notes.append(f"optimizer {optim} instead of {cfg.optim}")
    if cfg.fsdp:  # transformers/accelerate would quietly run DDP anyway: say so and ask for it
        notes.append("no FSDP sharding (it needs GPUs): several CPU ranks run data-parallel (DDP over gloo)")
    return Runtime("cpu", "float32", optim, False, notes)


def sft_kwargs(cfg: TrainConfig, runtime: Runtime, has_eval: bool) -> dict[str, Any]:
    """The SFTConfig this run uses, by Hugging Face field names (dry_run prints exactly this)."""
    kwargs = dict(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        completion_only_loss=not cfg.train_on_inputs,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=runtime.optim,
        bf16=runtime.bf16,
        use_cpu=runtime.device == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
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
    if cfg.gradient_checkpointing and runtime.fsdp:  # re-entrant checkpointing is what FSDP wraps correctly
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    kwargs.update(cfg.sft)
    return kwargs


def quantization_kwargs(cfg: TrainConfig, runtime: Runtime) -> dict[str, Any] | None:
    """BitsAndBytesConfig arguments for the base model; None for a 16-bit base."""
    if cfg.quant.bits == 8:
        return {"load_in_8bit": True}
    if cfg.quant.bits == 4:
        from alpaca_lora.model import four_bit_quantization

        kwargs = four_bit_quantization(cfg.quant.quant_type, cfg.quant.double_quant, runtime.compute_dtype)
        if runtime.fsdp and cfg.quant.quant_storage and cfg.quant.quant_storage != "uint8":
            kwargs["bnb_4bit_quant_storage"] = cfg.quant.quant_storage  # only FSDP needs the packed dtype
        return kwargs
    return None


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


def resolved_yaml(cfg: TrainConfig, runtime: Runtime, has_eval: bool) -> str:
    """The whole plan as YAML: our keys, and what they become in SFTConfig, bitsandbytes and peft."""
    plan = {
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "runtime": {"device": runtime.device, "world_size": cfg.world_size, "micro_batch_size": cfg.micro_batch_size,
                    "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                    "global_batch_size": cfg.batch_size, "adaptations": runtime.notes},
        "sft_config": sft_kwargs(cfg, runtime, has_eval),
        "quantization": quantization_kwargs(cfg, runtime),
        "lora": lora_kwargs(cfg) if cfg.finetune == "lora" else None,
    }
    if runtime.fsdp:  # auto_wrap wraps the model's own decoder layer class (its _no_split_modules)
        from alpaca_lora.plan import find_architecture

        architecture = find_architecture(cfg.model)
        plan["runtime"]["fsdp_wrapped_layer"] = architecture.layer_class if architecture else "the model's decoder layer"
    return OmegaConf.to_yaml(OmegaConf.create(plan))
