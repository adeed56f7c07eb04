"""Fine-tune a base model on Alpaca records or conversations: ``alpaca-lora train recipe=NAME key=value ...``
(also ``python -m alpaca_lora.train``, the form cluster scripts use).

A run reads top to bottom: the data (every record validated and tokenized before any model loads),
the run's plan (saved beside the outputs, checked against the GPU's memory), the model, the trainer,
training, and the outputs (checked, measured, plotted). TRL's SFTTrainer, peft and bitsandbytes do
the work. Preference tuning (``recipe=dpo``, ``recipe=kto``) runs the same stages with TRL's DPOTrainer or
KTOTrainer on an SFT adapter (``train.preference``): its preference data, its adapter on its base.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from alpaca_lora.common.errors import ConfigError, DataError
from alpaca_lora.common.logs import EVERY_RANK, get_logger
from alpaca_lora.common.paths import atomic_write_text, plain_permissions
from alpaca_lora.common.settings import entry_point
from alpaca_lora.data.examples import DataSummary, split_records, summarize, tokenize_records
from alpaca_lora.data.loading import LoadedData, load_records
from alpaca_lora.data.templates import ModelTemplate, Prompter, PromptTemplate, get_template, set_chat_template
from alpaca_lora.train import launcher
from alpaca_lora.train.adapter import check_adapter, name_base_as_given
from alpaca_lora.train.config import TrainConfig, help_text, load_config, warmup_problem
from alpaca_lora.train.packing import BatchPlan, batch_plan
from alpaca_lora.train.runtime import (
    Runtime,
    base_quantization,
    lora_kwargs,
    resolve_runtime,
    resolved_yaml,
    trainer_kwargs,
)

logger = get_logger(__name__)
every_rank = get_logger(EVERY_RANK)


@dataclass
class PreparedData:
    template: PromptTemplate | ModelTemplate
    tokenizer: object
    model_path: str
    train_set: object
    val_set: object
    val_records: list[dict]
    summary: DataSummary
    checkpoint: str | None
    multi_turn: bool = False  # earlier turns shown as turns (conversations), saved in training_config.yaml
    batches: BatchPlan | None = None  # set once the run's accumulation and world size are known
    lengths: list[int] | None = None  # tokens per example (a preference pair: its prompt and longest answer)

    @property
    def has_eval(self) -> bool:
        return len(self.val_set) > 0

    @property
    def prompter(self) -> Prompter:
        return Prompter(self.template, self.tokenizer, self.multi_turn)


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict
    trainer: object


def train(cfg: TrainConfig, runtime: Runtime, callbacks: list | None = None) -> TrainResult:
    """The whole run; ``callbacks`` are transformers ``TrainerCallback``s (progress hooks, tests)."""
    from alpaca_lora.train.checkpoints import SealCheckpoints

    data = setup_preference_data(cfg) if cfg.preference_tuning else setup_data(cfg)
    cfg = replace(cfg, multi_turn=data.multi_turn)  # decided by the data: saved for serving, merge and export
    cfg, memory_plan = settle_checkpointing(cfg, runtime, data.model_path)
    args = setup_run(cfg, runtime, data, memory_plan)
    model = setup_model(cfg, runtime, data.model_path)
    trainer = (setup_preference_trainer if cfg.preference_tuning else setup_trainer)(
        cfg, runtime, data, model, args, [*(callbacks or []), SealCheckpoints(cfg.model)])
    scored = data.val_records[: cfg.exact_match_eval]
    before = _exact_match(trainer.model, data, scored, "before training")
    result = trainer.train(resume_from_checkpoint=data.checkpoint)
    after = _exact_match(trainer.model, data, scored, "after training")
    return finish(cfg, data, trainer, result, before, after)


def settle_checkpointing(cfg: TrainConfig, runtime: Runtime, model: str):
    """The run's memory plan for this device (estimated once; None without one), with ``gradient_checkpointing=auto``
    decided by it and said in the log."""
    from alpaca_lora.train.plan import device_memory, plan_run

    cfg, why, memory_plan = plan_run(cfg, model, runtime.world_size, device_memory(runtime.device))
    logger.info(why)
    return cfg, memory_plan


def setup_data(cfg: TrainConfig) -> PreparedData:
    """Records loaded, validated, split and tokenized exactly as generation will prompt them (and the
    output directory and the checkpoint to resume from checked)."""
    from alpaca_lora.model import load_tokenizer, resolve_model
    from alpaca_lora.train.checkpoints import check_output_dir, find_checkpoint

    check_output_dir(cfg)
    checkpoint = find_checkpoint(cfg)  # before the data: a download or tokenization would be wasted on a typo
    template = get_template(cfg.template)
    data = load_records(cfg.data, cfg.columns, max_download_bytes=cfg.max_download_bytes, conversations=True)
    if not data.records:
        raise DataError(f"{data.source}: no records to train on")
    multi_turn = decide_multi_turn(cfg, data)
    try:
        train_records, val_records = split_records(data.records, cfg.val_set_size, cfg.seed)
    except DataError as exc:  # the recipes' 2000 rows (Stanford's split of 52K) against a small set of one's own
        raise ConfigError(f"key 'val_set_size': {data.source}: {exc}; a fraction (val_set_size=0.05) or 0 (no "
                          "validation split) fits any size") from None
    model_path = resolve_model(cfg.model)
    tokenizer = set_chat_template(load_tokenizer(model_path, cfg.trust_remote_code), template, multi_turn)  # saved
    train_set, stats = tokenize_records(train_records, template, tokenizer, cfg.max_length, cfg.truncation, multi_turn)
    val_set, val_stats = tokenize_records(val_records, template, tokenizer, cfg.max_length, cfg.truncation, multi_turn)
    summary = summarize(data.records, {k: stats[k] + val_stats[k] for k in stats}, data.duplicates_dropped,
                        cfg.max_length, cfg.truncation)
    logger.info(f"data: {data.source}: " + "; ".join(summary.lines()))
    if len(train_set) == 0:
        raise DataError(f"{data.source}: no usable example: all {len(train_records)} training records are over "
                        f"max_length={cfg.max_length} tokens ({stats['dropped']} prompts alone too long, "
                        f"{stats['dropped_too_long']} dropped with truncation={cfg.truncation}); raise max_length "
                        "or shorten the records")
    logger.info(f"split: {len(train_set)} train, {len(val_set)} validation examples")
    return PreparedData(template, tokenizer, model_path, train_set, val_set, val_records, summary, checkpoint,
                        multi_turn)


def decide_multi_turn(cfg: TrainConfig, data: LoadedData) -> bool:
    """How the model will be shown a chat's earlier turns: as turns when it trains on conversations, unless
    ``multi_turn=false`` (then each answer is its own example, its history folded into the template's input).
    Exact match scores Alpaca records' outputs only."""
    if cfg.exact_match_eval > 0 and data.conversations:
        raise ConfigError(f"key 'exact_match_eval': it scores Alpaca records' outputs, and {data.source} holds "
                          "conversations; leave it at 0")
    return data.conversations if cfg.multi_turn is None else bool(cfg.multi_turn)


def setup_preference_data(cfg: TrainConfig) -> PreparedData:
    """Preference records loaded, checked, split and tokenized as SFT tokenizes (``train.preference``), with the
    adapter's tokenizer and template, before any model loads."""
    from alpaca_lora.model import load_tokenizer, resolve_model
    from alpaca_lora.train.checkpoints import check_output_dir, find_checkpoint
    from alpaca_lora.train.preference import load_preferences, tokenize_preferences

    template = get_template(cfg.template)
    records = load_preferences(cfg.data, cfg.method, template)
    train_records, val_records = split_records(records, cfg.val_set_size, cfg.seed)
    check_output_dir(cfg)
    checkpoint = find_checkpoint(cfg)
    model_path = resolve_model(cfg.model)
    tokenizer = set_chat_template(load_tokenizer(cfg.adapter, cfg.trust_remote_code), template)
    train_set, summary, lengths = tokenize_preferences(train_records, cfg.method, tokenizer, cfg.max_length,
                                                       cfg.truncation)
    val_set, _, _ = tokenize_preferences(val_records, cfg.method, tokenizer, cfg.max_length, cfg.truncation)
    logger.info(f"data: {cfg.data}: " + "; ".join(summary.lines()))
    if len(train_set) == 0:
        raise DataError(f"{cfg.data}: nothing to train on: every record is over max_length={cfg.max_length} tokens "
                        f"(truncation={cfg.truncation}); raise max_length")
    if cfg.method == "kto":  # KTO reads its rows in order: shuffled once here, the same way on a resume
        train_set = train_set.shuffle(seed=cfg.seed).flatten_indices()
    logger.info(f"split: {len(train_set)} train, {len(val_set)} validation {cfg.method} rows")
    return PreparedData(template, tokenizer, model_path, train_set, val_set, [], summary, checkpoint,
                        lengths=lengths)


def setup_run(cfg: TrainConfig, runtime: Runtime, data: PreparedData, memory_plan=None):
    """The run's plan saved beside its outputs, TRL's config (SFTConfig, DPOConfig, KTOConfig) built, and the
    GPU's memory checked, all before the weights load."""
    import torch
    import trl

    from alpaca_lora.train.checkpoints import claim_output_dir

    if runtime.notes:
        logger.info(f"no GPU: training on CPU with {', '.join(runtime.notes)}")
    if runtime.world_size > 1:
        every_rank.info(f"rank {launcher.rank()} of {runtime.world_size}: global batch {cfg.batch_size} = micro "
                        f"batch {cfg.micro_batch_size} x accumulation {runtime.gradient_accumulation_steps(cfg)} x "
                        f"{runtime.world_size} ranks")
    lengths = data.lengths or [len(ids) for ids in data.train_set["input_ids"]]
    data.batches = batch_plan(lengths, cfg.max_length, cfg.micro_batch_size, runtime.gradient_accumulation_steps(cfg),
                              runtime.world_size, cfg.packing)
    logger.info("; ".join(data.batches.lines()))
    if cfg.max_steps < 1:  # an epoch run's length is known now (max_steps was checked with the settings)
        steps = math.ceil(cfg.num_epochs * data.batches.steps_per_epoch)
        short_run = warmup_problem(cfg.warmup, steps, f"the run's {steps} steps ({cfg.num_epochs:g} epochs)")
        if short_run:
            raise ConfigError(f"key 'warmup': {short_run}")
    config_class, kwargs = trainer_kwargs(cfg, runtime, data.has_eval)
    try:  # TRL's config checks its own fields
        args = getattr(trl, config_class)(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"invalid training settings: {str(exc).splitlines()[0]}") from None
    claim_output_dir(cfg, resolved_yaml(cfg, runtime, data.has_eval))  # after SFTConfig: the ranks can meet
    if runtime.device == "cuda":
        from alpaca_lora.train.plan import check_memory

        gpu_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        check_memory(memory_plan, cfg, gpu_bytes)
    return args


def setup_model(cfg: TrainConfig, runtime: Runtime, model_path: str):
    """The base, quantized as the model section says, ready for k-bit training."""
    import torch
    from peft import prepare_model_for_kbit_training

    from alpaca_lora.model import load_model
    from alpaca_lora.train.trainer import select_attention

    if runtime.device == "cuda" and runtime.world_size > 1:
        torch.cuda.set_device(launcher.local_rank())  # each rank its own GPU (and its own quantized copy)
    quantized = base_quantization(cfg, runtime) is not None
    dtype = "float32" if cfg.finetune == "full" else runtime.compute_dtype  # full fine-tuning: fp32 master weights
    if quantized and cfg.quant.quant_storage and runtime.fsdp:
        dtype = cfg.quant.quant_storage  # the non-quantized weights match the packed ones, so FSDP shards all
    model = load_model(model_path, cfg, runtime.device, dtype=dtype, sharded=bool(runtime.fsdp))
    if quantized and not runtime.fsdp:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    logger.info(f"attention: {select_attention(model, runtime.device, cfg.packing)}")
    if cfg.preference_tuning:
        from alpaca_lora.train.preference import attach_adapter

        model = attach_adapter(model, cfg.adapter)
    return model


def setup_trainer(cfg: TrainConfig, runtime: Runtime, data: PreparedData, model, args, callbacks: list | None):
    import torch
    from peft import LoraConfig
    from trl import SFTTrainer

    from alpaca_lora.model import train_adapters_in_float32
    from alpaca_lora.train.trainer import TargetLossSFTTrainer

    full = cfg.finetune == "full"
    torch.manual_seed(cfg.seed)
    own_loss = {"token_metrics": cfg.token_metrics} if cfg.loss_at_targets else {}
    trainer = (TargetLossSFTTrainer if cfg.loss_at_targets else SFTTrainer)(
        model=model,
        args=args,
        train_dataset=data.train_set,
        eval_dataset=data.val_set if data.has_eval else None,
        processing_class=data.tokenizer,
        peft_config=None if full else LoraConfig(**lora_kwargs(cfg)),
        callbacks=list(callbacks or []) + load_callbacks(cfg.callbacks),
        **own_loss,
    )
    if runtime.compute_dtype == "float32" and not full:
        train_adapters_in_float32(trainer.model)
    return trainer


def setup_preference_trainer(cfg: TrainConfig, runtime: Runtime, data: PreparedData, model, args,
                             callbacks: list | None):
    """TRL's DPOTrainer or KTOTrainer on the SFT adapter, its frozen copy the reference, both starting equal."""
    import torch

    from alpaca_lora.train.preference import TRAINERS, start_from_reference

    torch.manual_seed(cfg.seed)
    trainer = TRAINERS[cfg.method](
        model=model,
        ref_model=None,  # the reference is the SFT adapter, copied by TRL into a frozen "ref" adapter
        args=args,
        train_dataset=data.train_set,
        eval_dataset=data.val_set if data.has_eval else None,
        processing_class=data.tokenizer,
        callbacks=list(callbacks or []) + load_callbacks(cfg.callbacks),
    )
    start_from_reference(trainer.model, runtime.compute_dtype)
    return trainer


def finish(cfg: TrainConfig, data: PreparedData, trainer, result, before, after) -> TrainResult:
    """The model saved (consolidated under FSDP) and checked; metrics, the loss curve and the report."""
    from alpaca_lora.evaluate.exact_match import print_before_after
    from alpaca_lora.train.plots import plot_loss

    output_dir = Path(cfg.output_dir)
    full = cfg.finetune == "full"
    metrics = {"train": result.metrics, "data": data.summary.to_dict(), "batches": data.batches.to_dict(),
               "log_history": trainer.state.log_history}
    if data.has_eval:
        evals = [e for e in trainer.state.log_history if "eval_loss" in e]
        final_is_logged = evals and evals[-1]["step"] == trainer.state.global_step
        metrics["eval"] = evals[-1] if final_is_logged else trainer.evaluate()
    if before is not None:
        metrics["exact_match"] = {"examples": before.total, "before": before.accuracy, "after": after.accuracy}
    if trainer.is_fsdp_enabled:  # sharded checkpoints while training; one consolidated model at the end
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(output_dir))  # every rank takes part in gathering; only rank 0 writes
    if trainer.is_world_process_zero():
        plain_permissions(*output_dir.glob("*.safetensors"))  # safetensors writes 0600 whatever the umask
        atomic_write_text(output_dir / "README.md", model_card(cfg, data, trainer.state.global_step))
        if full:
            metrics["parameters"] = sum(p.numel() for p in trainer.model.parameters())
        else:
            metrics["adapter_parameters"] = check_adapter(output_dir)
            name_base_as_given(output_dir, cfg.model)
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2))
        plot_loss(trainer.state.log_history, output_dir / "loss.png", title=f"{cfg.recipe}: {cfg.model}")
        if before is not None:
            print_before_after(data.val_records[: cfg.exact_match_eval], before, after)
        weights = f"model: {output_dir} (safetensors + tokenizer)" if full else \
            f"adapter: {output_dir / 'adapter_model.safetensors'}"
        logger.info(f"{weights}; loss curve: {output_dir / 'loss.png'}; metrics: {output_dir / 'metrics.json'}")
    return TrainResult(output_dir, metrics, trainer)


def model_card(cfg: TrainConfig, data: PreparedData, steps: int) -> str:
    """The README.md beside the weights, in place of TRL's, which names a base on disk "[None](https://huggingface.co/
    None)": the base as given, the run in one sentence, and the commands that use it."""
    on_hub = data.model_path == cfg.model and not Path(cfg.model).expanduser().exists()
    base = f"[{cfg.model}](https://huggingface.co/{cfg.model})" if on_hub else f"`{cfg.model}`"
    kind = "A full fine-tune of" if cfg.finetune == "full" else \
        f"A LoRA adapter (r={cfg.lora.r}, alpha={cfg.lora.alpha}, on {', '.join(cfg.lora.target_modules)}) for"
    use = f"model={cfg.output_dir}" if cfg.finetune == "full" else f"adapter={cfg.output_dir}"
    front = ([f"base_model: {cfg.model}"] if on_hub else []) + \
        ([] if cfg.finetune == "full" else ["library_name: peft"]) + ["tags: [alpaca-lora, sft, trl]"]
    return "\n".join([
        "---", *front, "---", "", f"# {Path(cfg.output_dir).name}", "",
        f"{kind} {base}, trained with alpaca-lora (recipe `{cfg.recipe}`) on `{cfg.data}`: {len(data.train_set)} "
        f"training examples, {steps} optimizer steps, prompted with the `{cfg.template}` template. "
        "`training_config.yaml` holds every setting of the run, `metrics.json` its results.", "",
        "```bash", f'alpaca-lora generate {use} instruction="..."',
        *([] if cfg.finetune == "full" else [f"alpaca-lora merge {use} output={cfg.output_dir}-merged"]), "```", ""])


def _exact_match(model, data: PreparedData, records: list[dict], label: str):
    from alpaca_lora.evaluate.exact_match import exact_match

    return exact_match(model, data.prompter, records, label) if records else None


def dry_run_batches(cfg: TrainConfig, runtime: Runtime) -> list[str]:
    """What packing does to the batches (rows, tokens per micro batch, steps per epoch), when the data and
    the tokenizer are at hand; a dry run downloads nothing and loads no weights."""
    from alpaca_lora.common.errors import UserError
    from alpaca_lora.model import load_tokenizer, resolve_model

    if not (cfg.data.startswith("builtin:") or Path(cfg.data).expanduser().is_file()):
        return [f"batches: computed when training starts ({cfg.data} is not a local file)"]
    try:
        lengths = _example_lengths(cfg, load_tokenizer(cfg.adapter or resolve_model(cfg.model), cfg.trust_remote_code))
    except UserError as exc:
        return [f"batches: computed when training starts ({str(exc).splitlines()[0]})"]
    return batch_plan(lengths, cfg.max_length, cfg.micro_batch_size, runtime.gradient_accumulation_steps(cfg),
                      runtime.world_size, cfg.packing).lines()


def _example_lengths(cfg: TrainConfig, tokenizer) -> list[int]:
    """Tokens per training example (a preference pair: its prompt and longest answer), as training counts them."""
    template = get_template(cfg.template)
    if cfg.preference_tuning:
        from alpaca_lora.train.preference import load_preferences, tokenize_preferences

        train_records, _ = split_records(load_preferences(cfg.data, cfg.method, template), cfg.val_set_size,
                                         cfg.seed)
        return tokenize_preferences(train_records, cfg.method, tokenizer, cfg.max_length, cfg.truncation)[2]
    data = load_records(cfg.data, cfg.columns, conversations=True)
    train_records, _ = split_records(data.records, cfg.val_set_size, cfg.seed)
    train_set, _ = tokenize_records(train_records, template, set_chat_template(tokenizer, template), cfg.max_length,
                                    cfg.truncation, decide_multi_turn(cfg, data))
    return [len(ids) for ids in train_set["input_ids"]]


def load_callbacks(paths: list[str]) -> list:
    callbacks = []
    for path in paths:
        module, _, name = path.partition(":")
        try:
            callbacks.append(getattr(importlib.import_module(module), name)())
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"key 'callbacks': cannot load {path} ({exc})") from None
    return callbacks


def main(argv: list[str] | None = None) -> TrainResult | None:
    def run(cfg: TrainConfig) -> TrainResult | None:
        import torch

        runtime = resolve_runtime(cfg)
        if cfg.dry_run:
            if runtime.device == "cpu" or torch.cuda.is_available():  # else: decided on the GPU at start-up
                cfg, _ = settle_checkpointing(cfg, runtime, cfg.model)
            print(resolved_yaml(cfg, runtime, has_eval=cfg.val_set_size > 0), end="")
            for line in dry_run_batches(cfg, runtime):  # on stderr: stdout stays the plan, pure YAML
                logger.info(line)
            return None
        launcher.relaunch_if_needed(cfg, runtime, arguments)
        return train(cfg, runtime)

    arguments = list(argv) if argv is not None else sys.argv[1:]
    return entry_point(arguments, help_text, load_config, run)


if __name__ == "__main__":
    main()
