"""TRL's SFTTrainer with the LM head run only where a label is trained.

TRL 1.16 computes its loss through a chunked LM head that, on devices without Triton (CPU), scores
every position of the batch (prompt and padding included), and on every step it also computes
entropy and token accuracy for its logs. Here the model's own forward projects only the positions
whose next token is a target (transformers' ``logits_to_keep`` with a boolean mask) and the loss is
the cross-entropy there: the same value and gradients as the full computation, on every device, for
a fraction of the LM head's work. Entropy and token accuracy come from those same logits when asked
(``token_metrics``). Everything else (packing, the collator, logging, saving) is TRL's.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from alpaca_lora.common.errors import ConfigError

# Attention kernels that keep packed sequences apart: sdpa and eager proven on CPU (tests/test_packing.py), through
# transformers' block-diagonal mask from position_ids; flash-attention 2 by its variable-length kernels (GPU only,
# not verified here).
EXACT_WITH_PACKING = ("sdpa", "eager", "flash_attention_2")


class TargetLossSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose training and evaluation loss project the LM head only at target positions.

    Falls back to TRL's own loss where TRL does something this one does not (returning logits to
    metrics, a custom or DFT loss, label smoothing, MoE auxiliary loss, context/sequence parallelism).
    """

    def __init__(self, *args, token_metrics: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_metrics = token_metrics
        if self.padding_free and self.model.config._attn_implementation != "flash_attention_2":
            self.data_collator = PackedRowsCollator(self.data_collator.pad_token_id, self.args.pad_to_multiple_of)

    def _target_loss_applies(self, return_outputs: bool) -> bool:
        return not (return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                    or self.args.loss_type != "nll" or self.aux_loss_enabled
                    or self.accelerator.parallelism_config is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._target_loss_applies(return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        # Position t predicts token t + 1: keep the positions whose next token is trained (never the last one).
        next_labels = labels[:, 1:]
        trained = next_labels != -100
        targets = next_labels[trained]
        keep = F.pad(trained, (0, 1), value=False)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
        logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits  # (targets, vocabulary)
        if logits.ndim != 2 or logits.shape[0] != targets.numel():
            raise RuntimeError(f"{type(self.model).__name__} ignored logits_to_keep (got logits {tuple(logits.shape)} "
                               f"for {targets.numel()} targets): set loss_at_targets=false")
        logits = logits.float()
        targets = targets.to(logits.device)
        count = targets.numel() if num_items_in_batch is None else num_items_in_batch
        loss = F.cross_entropy(logits, targets, reduction="sum") / torch.as_tensor(count, device=logits.device).clamp(
            min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as TRL and Trainer: DDP averages
        self._log_token_counts(inputs, logits, targets)
        return loss

    def _log_token_counts(self, inputs, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """TRL's ``num_tokens`` (always: it is free), entropy and token accuracy (only with ``token_metrics``)."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        if self.token_metrics:
            with torch.no_grad():
                log_probs = logits.detach().log_softmax(-1)
                entropy = -(log_probs.exp() * log_probs).sum(-1).sum()
                correct = (logits.detach().argmax(-1) == targets).sum()
            gather = self.accelerator.gather_for_metrics
            count = gather(torch.tensor(targets.numel(), device=logits.device)).sum()
            entropy, correct = gather(entropy).sum(), gather(correct).sum()
            metrics["entropy"].append((entropy / count).item() if count > 0 else 0.0)
            metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
        if mode == "train":
            local = real_tokens(inputs)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


class PackedRowsCollator(DataCollatorForLanguageModeling):
    """Packed rows kept as the rows of the micro batch, for attention kernels that work through a mask.

    TRL's padding-free collator concatenates the micro batch into one sequence: ideal for flash-attention's
    variable-length kernels, but SDPA and eager attention then compute (and mask) a square of
    ``micro_batch_size x max_length`` tokens. Here each row stays a row, its sequences told apart by position ids
    that restart at every sequence (transformers' packed-sequence detection, exact as padding-free: see
    tests/test_packing.py); the padding of a shorter row is a sequence of its own with no labels, so no attention
    mask is needed, and attention costs ``micro_batch_size`` squares of ``max_length`` tokens.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        super().__init__(pad_token_id=pad_token_id, padding_free=False, return_position_ids=True,
                         pad_to_multiple_of=pad_to_multiple_of)

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        real = batch.pop("attention_mask").bool()
        padding_positions = (~real).cumsum(-1) - 1  # right padding: 0, 1, 2, ... a sequence of its own
        batch["position_ids"] = torch.where(real, batch["position_ids"], padding_positions)
        batch["labels"][batch["position_ids"] == 0] = -100  # a sequence's first token is never the previous' target
        return batch


def real_tokens(inputs: dict) -> torch.Tensor:
    """Tokens of a batch that are not padding: the attention mask's ones; without a mask (packed rows), all but
    the last sequence of a row when none of its labels is trained (``PackedRowsCollator``'s padding)."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    ids = inputs["input_ids"]
    if "position_ids" not in inputs:
        return torch.tensor(ids.numel(), device=ids.device)
    segment = (inputs["position_ids"] == 0).cumsum(-1)
    last = segment == segment[:, -1:]
    padding = last & ~(last & (inputs["labels"] != -100)).any(-1, keepdim=True)
    return ids.numel() - padding.sum()


def attention_implementation(device: str) -> tuple[str, str]:
    """The attention kernel for training, and why: on a GPU, flash-attention 2's variable-length kernels when the
    ``flash_attn`` package is installed and the GPU is Ampere or newer (packed sequences run without any mask);
    PyTorch's SDPA otherwise (packed sequences through a block-diagonal mask)."""
    if device != "cuda":
        return "sdpa", "PyTorch SDPA (no GPU)"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "PyTorch SDPA (pip install flash-attn for its variable-length kernels)"
    if torch.cuda.get_device_capability()[0] < 8:
        return "sdpa", "PyTorch SDPA (flash-attn is installed but needs an Ampere or newer GPU)"
    return "flash_attention_2", "flash-attention 2 (variable-length kernels for packed sequences)"


def select_attention(model, device: str, packing: bool) -> str:
    """Sets the model's attention kernel (see ``attention_implementation``) and says which, for the log.

    With packing, refuses kernels not known to keep packed sequences apart, before any training step."""

    wanted, why = attention_implementation(device)
    try:
        model.set_attn_implementation(wanted)
    except (ImportError, ValueError) as exc:  # the model does not support it: keep its own
        why = f"{model.config._attn_implementation} ({wanted} unavailable: {str(exc).splitlines()[0]})"
    name = model.config._attn_implementation
    if packing and name not in EXACT_WITH_PACKING:
        raise ConfigError(f"key 'packing': attention implementation '{name}' is not known to keep packed sequences "
                          f"apart (exact: {', '.join(EXACT_WITH_PACKING)}); set packing=false")
    return why
