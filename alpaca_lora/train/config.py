"""Training configuration: built-in defaults <- a recipe (YAML, possibly extending another) <-
``key=value`` overrides, merged by OmegaConf into a typed :class:`TrainConfig` and validated (every problem
reported at once). ``runtime`` translates it into the Hugging Face objects that do the work.

The defaults are the QLoRA paper's settings; a recipe states what it is for and what differs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from alpaca_lora.common.errors import ConfigError, UserError
from alpaca_lora.common.settings import Layer, build, check, command_line, key, key_lines, peek
from alpaca_lora.data.loading import MAX_DOWNLOAD_BYTES, MAX_DOWNLOAD_HELP
from alpaca_lora.model_args import (
    ModelArguments,
    model_checks,
    saved_config,
    saved_model_layer,
)
from alpaca_lora.train import launcher

# recipes/ at the top of a checkout; inside the package (alpaca_lora/recipes) in a wheel, where setuptools puts it
_PACKAGE = Path(__file__).resolve().parents[1]
RECIPES_DIR = next((p for p in (_PACKAGE / "recipes", _PACKAGE.parent / "recipes") if p.is_dir()), _PACKAGE / "recipes")
DEFAULT_RECIPE = "qlora"
TOOL = "train"
TRUNCATION = ("cut", "cut_eos", "drop")
METHODS = ("sft", "dpo", "kto")


@dataclass
class LoraSettings:
    r: int = key(64, "LoRA rank")
    alpha: int = key(16, "LoRA alpha (scaling is alpha / r)")
    dropout: float = key(0.05, "dropout on the LoRA path")
    target_modules: List[str] = key(["all-linear"], "modules to adapt; 'all-linear' means every linear layer")


@dataclass
class PreferenceSettings:
    beta: float = key(0.1, "method=dpo/kto: how strongly the tuned policy is held to the reference (the SFT adapter)")
    loss_type: Optional[str] = key(None, "method=dpo/kto: TRL's loss_type (dpo: sigmoid, ipo, hinge, robust, ...; "
                                         "kto: kto or apo_zero_unpaired); default TRL's (sigmoid, kto)")
    desirable_weight: float = key(1.0, "method=kto: loss weight of the desirable answers (label true)")
    undesirable_weight: float = key(1.0, "method=kto: loss weight of the undesirable answers (label false)")
    trl: Dict[str, Any] = key({}, "extra DPOConfig / KTOConfig fields by their Hugging Face names, e.g. "
                                  "preference.trl.precompute_ref_log_probs=true")


@dataclass
class TrainConfig(ModelArguments):
    model: str = key(MISSING, "base model: hub id, local directory, .gguf file, or package:MODULE/FILE.gguf")
    recipe: str = key(DEFAULT_RECIPE, "recipe name (alpaca-lora recipes lists them) or a path to a YAML file")
    description: str = key("", "what the recipe is for (shown by alpaca-lora recipes)")
    method: str = key("sft", "sft (supervised, on instruction data), or preference tuning of an SFT adapter on "
                             "votes (alpaca-lora feedback export): dpo (pairs) or kto (answers labelled good or bad)")
    adapter: Optional[str] = key(None, "method=dpo/kto: the SFT adapter to tune; it names the base, bits and template "
                                       "(its training_config.yaml) and is the reference policy")
    finetune: str = key("lora", "lora (adapters on a frozen base) or full (every parameter, no adapters)")
    data: str = key("tatsu-lab/alpaca", "data: .json/.jsonl file, http(s) URL, hub dataset id, or builtin:NAME")
    columns: Dict[str, str] = key({}, "map our fields to the data's, e.g. columns.output=response")
    max_download_bytes: int = key(MAX_DOWNLOAD_BYTES, MAX_DOWNLOAD_HELP)
    output_dir: str = key("outputs/qlora", "where the adapter, checkpoints, training_config.yaml, metrics.json, "
                                           "loss.png go")
    max_steps: int = key(-1, "stop after this many optimizer steps (-1: run num_epochs)")
    num_epochs: float = key(3.0, "passes over the training split")
    learning_rate: float = key(2e-4, "peak learning rate")
    batch_size: int = key(16, "global batch size (sequences per optimizer step, all devices together)")
    micro_batch_size: int = key(4, "sequences per device per forward pass")
    max_length: int = key(512, "maximum tokens per example (see truncation)")
    truncation: str = key("cut", "an example over max_length: cut (its response is cut, no EOS, as Stanford and "
                                 "alpaca-lora do), cut_eos (cut, then EOS: teaches stopping mid-sentence) or drop")
    train_on_inputs: bool = key(False, "also train on the prompt (alpaca-lora's default); false masks it (Stanford)")
    val_set_size: float = key(0.0, "validation split: a fraction (<1) or a number of rows (>=1); 0 for none")
    seed: int = key(42, "seed for the split, shuffling and LoRA initialisation")
    resume_from_checkpoint: Optional[str] = key(None, "true: newest complete checkpoint in output_dir; or a "
                                                      "checkpoint path (it must come from a run with the same "
                                                      "model, data and LoRA settings)")
    overwrite: bool = key(False, "replace the run already in output_dir (its checkpoints, weights and metrics); "
                                 "without it, or resume_from_checkpoint, a second run there is refused")
    dry_run: bool = key(False, "print the resolved configuration (with the derived SFTConfig) and exit")
    optim: str = key("paged_adamw_32bit", "optimizer name as transformers knows it")
    lr_scheduler: str = key("constant", "learning-rate schedule (transformers' lr_scheduler_type)")
    warmup: float = key(0.03, "learning-rate warmup: a fraction of the steps (<1) or a number of steps (>=1)")
    weight_decay: float = key(0.0, "AdamW weight decay")
    max_grad_norm: float = key(0.3, "gradient clipping norm")
    gradient_checkpointing: Any = key("auto", "recompute activations in the backward pass to save memory (about a "
                                              "third more compute): true, false, or auto: off when the memory plan "
                                              "without it stays under 70% of the device's memory, on otherwise")
    group_by_length: bool = key(True, "batch examples of similar length together (less padding, faster; "
                                      "not with packing)")
    packing: bool = key(True, "pack examples into rows of max_length tokens, micro_batch_size rows per micro "
                              "batch (TRL best-fit decreasing; exact: sequences never attend to each other)")
    loss_at_targets: bool = key(True, "run the LM head and loss only where labels are trained (exact); false: "
                                      "TRL's chunked head on every position")
    token_metrics: bool = key(False, "also log entropy and token accuracy of the predictions (costs time)")
    logging_steps: int = key(10, "log the training loss every N steps")
    eval_steps: int = key(200, "evaluate on the validation split every N steps")
    save_steps: int = key(200, "write a resumable checkpoint every N steps")
    save_total_limit: int = key(3, "checkpoints kept in output_dir")
    report_to: List[str] = key(["tensorboard"], "loggers: tensorboard, wandb (W&B reads WANDB_* variables)")
    exact_match_eval: int = key(0, "score exact-match accuracy on N validation rows before and after training")
    fsdp: Optional[str] = key("", "FSDP sharding for multi-GPU runs, as transformers spells it (empty for none)")
    fsdp_config: Dict[str, Any] = key({}, "transformers' fsdp_config (the wrapped layer class defaults to the "
                                          "model's own decoder layer)")
    tf32: bool = key(False, "allow TF32 matmuls on Ampere or newer GPUs")
    nproc: Optional[int] = key(None, "processes to start when not under a launcher (default: one per visible GPU)")
    force: bool = key(False, "train even when the memory plan predicts the GPU will run out")
    callbacks: List[str] = key([], "extra transformers TrainerCallback classes, as module:Class import paths")
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA adapter settings"})
    sft: Dict[str, Any] = key({}, "extra SFTConfig fields by their Hugging Face names, "
                                  "e.g. sft.logging_first_step=true")
    preference: PreferenceSettings = field(default_factory=PreferenceSettings,
                                           metadata={"help": "preference tuning (method=dpo or kto)"})

    @property
    def resuming(self) -> bool:
        return (self.resume_from_checkpoint or "").lower() not in {"", "false", "none"}

    @property
    def preference_tuning(self) -> bool:
        return self.method in ("dpo", "kto")


def recipe_path(name: str, relative_to: Path | None = None) -> Path:
    """A shipped recipe by name, or a YAML file by path (relative to an extending recipe's folder)."""
    path = Path(name).expanduser()
    if path.suffix in {".yaml", ".yml"}:
        if not path.is_absolute() and relative_to is not None and (relative_to / path).is_file():
            path = relative_to / path
        if not path.is_file():
            raise ConfigError(f"recipe file {name} not found")
        return path
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe '{name}'; available: {', '.join(recipe_names())}")
    return path


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_layers(name: str, relative_to: Path | None = None, seen: tuple = ()) -> list[Layer]:
    """The recipe's YAML as a settings layer, after the layers of the recipe it ``extends``."""
    path = recipe_path(name, relative_to)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' makes a cycle")
    try:
        values = OmegaConf.load(path)
    except Exception as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    parent = values.pop("extends", None) if isinstance(values, DictConfig) else None
    layers = recipe_layers(str(parent), path.parent, (*seen, path.resolve())) if parent else []
    return layers + [Layer(str(path), values)]


def load_config(overrides: list[str], schema: type = None) -> TrainConfig:
    """Defaults <- recipe YAML <- the adapter's saved model section and LoRA shape (``adapter=``, preference
    tuning) <- ``key=value`` overrides, as a validated :class:`TrainConfig`."""
    schema = schema or TrainConfig
    cli = command_line(overrides, schema)
    recipe = peek(overrides, "recipe") or DEFAULT_RECIPE
    layers = recipe_layers(recipe)
    adapter = peek(overrides, "adapter") or next((str(layer.values.get("adapter")) for layer in reversed(layers)
                                                  if layer.values.get("adapter")), None)
    cfg = build(schema, [*layers, *adapter_layers(adapter), cli], TOOL)
    cfg.recipe = recipe
    validate(cfg)
    return cfg


def adapter_layers(adapter: str | None) -> list[Layer]:
    """What an adapter being tuned says about the run: the base, bits and template it was trained with (as
    inference reads them) and its LoRA shape (adapter_config.json: the memory plan counts it)."""
    import json

    if not adapter:
        return []
    config = Path(adapter).expanduser() / "adapter_config.json"
    saved = saved_model_layer(adapter, adapter=True) if config.is_file() else None
    if saved is None:
        missing = "adapter_config.json" if not config.is_file() else "training_config.yaml (its base is unknown)"
        raise ConfigError(f"key 'adapter': {adapter}: no {missing} there (an adapter directory written by "
                          "alpaca-lora train)")
    try:
        lora = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"key 'adapter': {config}: not readable JSON ({str(exc).splitlines()[0]})") from None
    targets = lora.get("target_modules")
    shape = {"r": lora.get("r"), "alpha": lora.get("lora_alpha"), "dropout": lora.get("lora_dropout"),
             "target_modules": sorted(targets) if isinstance(targets, list) else [targets] if targets else None}
    return [saved, Layer(str(config), {"lora": {k: v for k, v in shape.items() if v is not None}})]


def validate(cfg: TrainConfig) -> None:
    """Checks the meaning of values (types were checked by OmegaConf); every problem names its key."""
    from alpaca_lora.data.templates import get_template

    world = launcher.planned_world_size(cfg.nproc, cfg.device)
    short_run = warmup_problem(cfg.warmup, cfg.max_steps, f"max_steps={cfg.max_steps}") if cfg.max_steps >= 1 else None
    checks = model_checks(cfg) + [
        (cfg.micro_batch_size >= 1, "micro_batch_size", "must be at least 1"),
        (lambda: cfg.batch_size % (cfg.micro_batch_size * world) == 0, "batch_size",
         f"must be a multiple of micro_batch_size x processes ({cfg.micro_batch_size} x {world})"),
        (cfg.max_length >= 8, "max_length", "must be at least 8"),
        (cfg.truncation in TRUNCATION, "truncation", f"must be one of {', '.join(TRUNCATION)}"),
        (cfg.val_set_size >= 0, "val_set_size", "must be 0 or more"),
        (cfg.max_steps == -1 or cfg.max_steps >= 1, "max_steps", "must be -1 (train num_epochs) or at least 1"),
        (cfg.max_steps > 0 or cfg.num_epochs > 0, "num_epochs", "must be positive when max_steps is -1"),
        (not short_run, "warmup", f": {short_run}"),
        (cfg.learning_rate > 0, "learning_rate", "must be positive"),
        (cfg.warmup >= 0, "warmup", "must be 0 or more"),
        (cfg.lora.r >= 1, "lora.r", "must be at least 1"),
        (bool(cfg.lora.target_modules), "lora.target_modules", "must name at least one module"),
        (set(cfg.columns) <= {"instruction", "input", "output"}, "columns",
         "may only map instruction, input and output"),
        (cfg.exact_match_eval <= 0 or cfg.val_set_size > 0, "exact_match_eval",
         "needs a validation split (val_set_size)"),
        (cfg.finetune in ("lora", "full"), "finetune", "must be lora or full"),
        (cfg.finetune == "lora" or cfg.quant.bits == 16, "quant.bits",
         "must be 16 with finetune=full (quantized weights cannot be trained)"),
        (cfg.nproc is None or cfg.nproc >= 1, "nproc", "must be at least 1"),
        (cfg.gradient_checkpointing in (True, False, "auto"), "gradient_checkpointing", "must be true, false or auto"),
        (cfg.max_download_bytes >= 1, "max_download_bytes", "must be at least 1"),
        (not (cfg.overwrite and cfg.resuming), "overwrite",
         "cannot go with resume_from_checkpoint (resuming keeps the run in output_dir, overwrite replaces it)"),
    ]
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    checks += [(name in known, f"sft.{name}", "is not an SFTConfig field") for name in cfg.sft]
    checks += method_checks(cfg)
    try:
        get_template(cfg.template)
    except UserError as exc:
        checks.append((False, "template", f": {exc}"))  # the message names the template
    check(checks)


def warmup_problem(warmup: float, steps: int, counted: str) -> str | None:
    """Why a run of ``steps`` optimizer steps cannot train with this warmup, or None. Counted as transformers
    counts it (a fraction rounds up), the warmup covers the whole run when it is not shorter than it: the learning
    rate never reaches its peak, and a 1-step run takes its one step at learning rate 0 and learns nothing."""
    warmup_steps = int(warmup) if warmup >= 1 else math.ceil(steps * warmup)
    if warmup_steps < steps:
        return None
    given = f"{warmup:g} of {counted} is {warmup_steps}" if warmup < 1 else f"{warmup_steps}"
    return (f"{given} warmup step{'s' if warmup_steps != 1 else ''}, not fewer than the run's {steps} step"
            f"{'s' if steps != 1 else ''}: the learning rate would never leave its warmup ramp (which starts at 0"
            f"{': a 1-step run learns nothing' if steps == 1 else ''}); set warmup=0, a smaller warmup, or more steps")


def method_checks(cfg: TrainConfig) -> list:
    """What preference tuning (``method=dpo|kto``) needs, and what it cannot do."""
    method = cfg.method
    if not cfg.preference_tuning:
        return [(method in METHODS, "method", f"must be one of {', '.join(METHODS)}"),
                (not cfg.adapter, "adapter", "is for method=dpo or kto (preference tuning of an SFT adapter); SFT "
                                             "trains a new adapter on the base")]
    config_class = preference_config_class(method)
    choices = trl_choices(config_class, "loss_type")
    return [
        (bool(cfg.adapter), "adapter", f"must be set with method={method}: the SFT adapter to tune (alpaca-lora "
                                       "train recipe=qlora writes one)"),
        *same_as_adapter(cfg),
        (cfg.finetune == "lora", "finetune", f"must be lora with method={method} (the adapter is what is tuned)"),
        (not cfg.packing, "packing", f"must be false with method={method} (TRL's preference trainers do not pack)"),
        (not cfg.fsdp, "fsdp", f"is not supported with method={method} yet"),
        (cfg.exact_match_eval == 0, "exact_match_eval", f"must be 0 with method={method}: preference data has no "
                                                        "reference answers (evaluate judge compares the adapters)"),
        (not cfg.train_on_inputs, "train_on_inputs", f"must be false with method={method} (the loss is on answers)"),
        (method != "kto" or cfg.micro_batch_size >= 2, "micro_batch_size",
         "must be at least 2 with method=kto: its reference point is estimated from the other answers of a micro "
         "batch (TRL requires 2 or more)"),
        (cfg.preference.beta > 0, "preference.beta", "must be positive"),
        (cfg.preference.desirable_weight > 0 and cfg.preference.undesirable_weight > 0,
         "preference.desirable_weight", "and undesirable_weight must be positive"),
        (cfg.preference.loss_type is None or not choices or cfg.preference.loss_type in choices,
         "preference.loss_type", f"must be one of {', '.join(choices)} with method={method}"),
        (not cfg.sft, "sft", f"holds SFTConfig fields; with method={method} use preference.trl.NAME"),
        *[(name in {f.name for f in dataclasses.fields(config_class)}, f"preference.trl.{name}",
           f"is not a {config_class.__name__} field") for name in cfg.preference.trl],
    ]


def same_as_adapter(cfg: TrainConfig) -> list:
    """The base and template come from the adapter; another base would not fit it, another template teaches a
    prompt it never saw."""
    saved = saved_config(cfg.adapter) if cfg.adapter and Path(cfg.adapter).is_dir() else {}
    if not saved:
        return []
    real = [str(Path(v).expanduser().resolve()) if Path(str(v)).expanduser().exists() else v
            for v in (cfg.model, saved.get("model"))]
    return [(real[0] == real[1], "model", f": {cfg.model} is not {saved.get('model')}, the base {cfg.adapter} was "
                                          "trained on; leave model= out (the adapter names it)"),
            (cfg.template == saved.get("template"), "template", f": {cfg.template} is not {saved.get('template')}, "
                                                                f"the template {cfg.adapter} was trained with")]


def preference_config_class(method: str):
    from trl import DPOConfig, KTOConfig

    return {"dpo": DPOConfig, "kto": KTOConfig}[method]


def trl_choices(config_class: type, name: str) -> tuple[str, ...]:
    """The values TRL documents for one of its config's fields (its metadata's choices, or the quoted names in
    its help), so a typo fails here and not at the first loss computed."""
    import re

    found = next(f for f in dataclasses.fields(config_class) if f.name == name).metadata
    return tuple(found.get("choices") or re.findall(r"`'(\w+)'`", found.get("help", "")))


def help_text() -> str:
    lines = [
        f"usage: alpaca-lora {TOOL} [recipe=NAME] [key=value ...]   (also: python -m alpaca_lora.train ...)",
        f"recipes: {', '.join(recipe_names())} (default {DEFAULT_RECIPE}; alpaca-lora recipes says what each is "
        "for); a recipe sets its own values, dry_run=true shows them",
        "keys (dotted keys set nested ones, e.g. lora.r=16; text keys are taken as typed), with their built-in "
        "defaults:",
    ]
    return "\n".join(lines + key_lines(TrainConfig))


