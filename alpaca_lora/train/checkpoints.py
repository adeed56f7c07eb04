"""A training run's output directory: whose run it holds, and which checkpoint resumes it.

transformers writes a checkpoint file by file (weights, optimizer, scheduler, RNG states, and
``trainer_state.json`` last); a run killed in between leaves a directory that looks like a checkpoint
and cannot be resumed. :class:`SealCheckpoints`, a ``TrainerCallback``, copies the run's
``training_config.yaml`` into each checkpoint once every process has finished writing it: a checkpoint
is complete when it carries one, and that configuration says which run it belongs to. A second run
into a directory holding a run is refused unless it resumes it or replaces it (``overwrite=true``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.paths import atomic_write_text, plain_permissions
from alpaca_lora.model_args import LEGACY_SAVED_CONFIGS, SAVED_CONFIG, saved_config
from alpaca_lora.train import launcher
from alpaca_lora.train.adapter import name_base_as_given
from alpaca_lora.train.config import TrainConfig

logger = get_logger(__name__)
TRAINER_STATE = "trainer_state.json"
# The keys a checkpoint must share with the run that resumes it. Its weights and optimizer state
# belong to one base, one kind of fine-tune, one adapter shape and scale, one quantization. The
# trainer resumes mid-epoch by skipping the batches it has seen, so the examples (data, columns,
# template, max_length, truncation, masking), their split and order (val_set_size, seed), the
# batch size and the packing into rows must not change either. Not compared: max_steps and
# num_epochs (lengthening a run is what resuming is for), the learning-rate keys (a deliberate
# change), and the machine's keys (device, nproc, micro_batch_size, gradient_checkpointing).
RUN_KEYS = ("model", "finetune", "quant.bits", "quant.quant_type", "quant.double_quant", "data", "columns",
            "template", "max_length", "truncation", "train_on_inputs", "val_set_size", "seed", "batch_size", "packing")
LORA_KEYS = ("lora.r", "lora.alpha", "lora.dropout", "lora.target_modules")
# Preference tuning: the same method, on the same SFT adapter (it is also the reference), with the same loss.
PREFERENCE_KEYS = ("method", "adapter", "preference.beta", "preference.loss_type", "preference.desirable_weight",
                   "preference.undesirable_weight")
PATH_KEYS = ("model", "data", "template", "adapter")
# A run's files at the top of output_dir: the first ones mark a run; overwrite=true removes them all.
RUN_MARKS = (SAVED_CONFIG, *LEGACY_SAVED_CONFIGS, f"{PREFIX_CHECKPOINT_DIR}-*", "adapter_config.json", "metrics.json")
RUN_OUTPUTS = (*RUN_MARKS, "adapter_model.safetensors", "model*.safetensors", "model.safetensors.index.json",
               "loss.png", "runs", "README.md")  # runs/: TensorBoard's logs


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` directories, newest (highest N) first."""
    pattern = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and (m := pattern.fullmatch(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / SAVED_CONFIG).is_file() and (checkpoint / TRAINER_STATE).is_file()


def check_output_dir(cfg: TrainConfig) -> None:
    """A directory that holds a run is trained into again only to resume it or to replace it."""
    if cfg.overwrite or cfg.resuming:
        return
    found = sorted({p.name for mark in RUN_MARKS for p in Path(cfg.output_dir).glob(mark)})
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(f"key 'output_dir': {cfg.output_dir} holds another run ({shown}); resume it with "
                          "resume_from_checkpoint=true, choose another output_dir, or set overwrite=true to "
                          "replace it")


def find_checkpoint(cfg: TrainConfig) -> str | None:
    """``resume_from_checkpoint``: true means the newest complete checkpoint in ``output_dir`` (saying
    which torn ones it skips); else a path. Either way it must come from a run like this one."""
    if not cfg.resuming:
        return None
    value = cfg.resume_from_checkpoint
    if value.lower() in {"true", "latest"}:
        found = checkpoints(cfg.output_dir)
        complete = [c for c in found if is_complete(c)]
        if not complete:
            raise ConfigError(f"key 'resume_from_checkpoint' is true but {cfg.output_dir} holds "
                              f"{_none_complete(found) if found else 'no checkpoint-* yet'}")
        checkpoint = complete[0]
        for torn in found[: found.index(checkpoint)]:
            logger.warning(f"skipping {torn.name}: interrupted while being written ({_missing(torn)}); "
                           f"resuming from {checkpoint.name}")
    else:
        checkpoint = Path(value).expanduser()
        if not checkpoint.is_dir():
            raise ConfigError(f"key 'resume_from_checkpoint': no checkpoint directory {value}")
        if not (checkpoint / TRAINER_STATE).is_file():
            raise ConfigError(f"key 'resume_from_checkpoint': {value} is incomplete: interrupted while being "
                              f"written ({_missing(checkpoint)}); resume from an older checkpoint")
        if not (checkpoint / SAVED_CONFIG).is_file():
            logger.warning(f"{value} carries no {SAVED_CONFIG} (written by an older version): not checked "
                           "against this run's configuration")
            return str(checkpoint)
    check_same_run(cfg, checkpoint)
    logger.info(f"resuming from {checkpoint}")
    return str(checkpoint)


def _none_complete(found: list[Path]) -> str:
    unchecked = [c for c in found if (c / TRAINER_STATE).is_file()]
    if unchecked:  # written by a version before checkpoints carried their configuration
        return (f"no checkpoint carrying its run's {SAVED_CONFIG}; resume_from_checkpoint={unchecked[0]} resumes "
                "it unchecked")
    return (f"no complete checkpoint ({', '.join(c.name for c in found)}: interrupted while being written); "
            "train again with overwrite=true instead")


def _missing(checkpoint: Path) -> str:
    return f"no {TRAINER_STATE if not (checkpoint / TRAINER_STATE).is_file() else SAVED_CONFIG}"


def check_same_run(cfg: TrainConfig, checkpoint: Path) -> None:
    """The checkpoint's saved configuration against this run's, key by key (see RUN_KEYS)."""
    saved = saved_config(checkpoint)
    now = OmegaConf.to_container(OmegaConf.structured(cfg))
    saved.setdefault("method", "sft")  # written before preference tuning existed
    preference = cfg.preference_tuning or saved["method"] != "sft"
    keys = RUN_KEYS + (LORA_KEYS if cfg.finetune == "lora" else ()) + (PREFERENCE_KEYS if preference else ())
    differences = []
    for key in keys:
        before, after = _lookup(saved, key), _lookup(now, key)
        if key in PATH_KEYS:
            before, after = _real_path(before), _real_path(after)
        if before != after:
            differences.append(f"{key}: {before!r} there, {after!r} now")
    if differences:
        raise ConfigError(f"key 'resume_from_checkpoint': {checkpoint} belongs to another run: "
                          f"{'; '.join(differences)}; resume with that run's settings, or train this one into "
                          "another output_dir (or with overwrite=true)")


def _lookup(values: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def _real_path(value: Any) -> Any:
    """A local path however it is spelled (relative, ``~``, through a symlink); anything else as it is."""
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def claim_output_dir(cfg: TrainConfig, plan_yaml: str) -> None:
    """Once every process has checked ``output_dir`` (in setup_data), the first one removes the
    previous run (``overwrite=true``) and writes this run's plan."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()
    if launcher.rank() != 0:
        return
    output_dir = Path(cfg.output_dir)
    if cfg.overwrite:
        removed = sorted({p for pattern in RUN_OUTPUTS for p in output_dir.glob(pattern)})
        for path in removed:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if removed:
            logger.info(f"overwrite=true: removed the previous run's {', '.join(p.name for p in removed)} "
                        f"from {output_dir}")
    atomic_write_text(output_dir / SAVED_CONFIG, plan_yaml)


class SealCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once every process has written it, by copying the run's
    ``training_config.yaml`` into it; a checkpoint about to be written again (after a resume from an
    older one) loses that mark first, so a kill while it is rewritten leaves it torn, not mixed. A checkpoint's
    adapter names its base as the run's ``base`` was given (it can be copied, as the final adapter)."""

    def __init__(self, base: str):
        self.base = base

    def on_step_end(self, args, state, control, **kwargs):
        self._unseal_before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._unseal_before_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank's files (shards, RNG states) are written
        if state.is_world_process_zero:
            plan = (Path(args.output_dir) / SAVED_CONFIG).read_text(encoding="utf-8")
            checkpoint = self._checkpoint(args, state)
            plain_permissions(checkpoint)  # safetensors writes 0600 whatever the umask
            name_base_as_given(checkpoint, self.base)
            atomic_write_text(checkpoint / SAVED_CONFIG, plan)

    def _unseal_before_save(self, args, state, control) -> None:
        if control.should_save and state.is_world_process_zero:
            (self._checkpoint(args, state) / SAVED_CONFIG).unlink(missing_ok=True)

    @staticmethod
    def _checkpoint(args, state) -> Path:
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
