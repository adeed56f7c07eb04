"""What packing does to the batches: rows, tokens per micro batch and optimizer steps per epoch.

Computed from the tokenized example lengths with TRL's own best-fit-decreasing packer (the one
SFTTrainer runs with ``packing=True``), so the figures are the ones training sees. With packing, a
micro batch is ``micro_batch_size`` rows of up to ``max_length`` tokens each (kept as rows for SDPA
and eager attention, concatenated into one sequence for flash-attention's variable-length kernels):
activation memory is for ``micro_batch_size x max_length`` tokens, and an optimizer step sees more
examples than without.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class BatchPlan:
    packing: bool
    examples: int
    rows: int  # packed rows of at most max_length tokens (the examples themselves without packing)
    tokens: int  # real tokens in one epoch
    max_length: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    micro_batches_per_epoch: int  # per process
    steps_per_epoch: int
    unpacked_steps_per_epoch: int

    @property
    def tokens_per_micro_batch(self) -> float:
        """Real tokens per micro batch on average (one process); the most is micro_batch_size x max_length."""
        return self.tokens / max(self.micro_batches_per_epoch * self.world_size, 1)

    @property
    def examples_per_step(self) -> float:
        return self.examples / max(self.steps_per_epoch, 1)

    def lines(self) -> list[str]:
        if not self.packing:
            return [f"no packing: {self.examples} examples, micro batch {self.micro_batch_size} examples "
                    f"(~{self.tokens_per_micro_batch:.0f} real tokens, padded to the longest), "
                    f"{self.steps_per_epoch} optimizer steps per epoch"]
        fill = self.tokens / max(self.rows * self.max_length, 1)
        return [f"packing: {self.examples} examples into {self.rows} rows of at most {self.max_length} tokens "
                f"({self.examples / max(self.rows, 1):.1f} examples per row, {fill:.0%} full)",
                f"micro batch: {self.micro_batch_size} packed rows, "
                f"~{self.tokens_per_micro_batch:.0f} real tokens (at most {self.micro_batch_size * self.max_length})",
                f"{self.steps_per_epoch} optimizer steps per epoch of ~{self.examples_per_step:.1f} examples each "
                f"(without packing: {self.unpacked_steps_per_epoch})"]

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_micro_batch": round(self.tokens_per_micro_batch, 1),
                "examples_per_step": round(self.examples_per_step, 2)}


def _steps(rows: int, micro_batch_size: int, gradient_accumulation_steps: int, world_size: int) -> tuple[int, int]:
    """(micro batches per process, optimizer steps) for one epoch, as transformers' Trainer counts them."""
    micro_batches = math.ceil(math.ceil(rows / world_size) / micro_batch_size)
    return micro_batches, max(math.ceil(micro_batches / gradient_accumulation_steps), 1)


def packed_row_lengths(lengths: Sequence[int], max_length: int) -> list[int]:
    """Token count of every row TRL's best-fit-decreasing packer makes from examples of these lengths."""
    import datasets
    from trl import pack_dataset

    dataset = datasets.Dataset.from_dict({"input_ids": [[0] * min(n, max_length) for n in lengths if n > 0]})
    packed = pack_dataset(dataset, max_length, strategy="bfd", map_kwargs={"desc": "Planning packed rows"})
    return [sum(row) for row in packed["seq_lengths"]]


def batch_plan(lengths: Sequence[int], max_length: int, micro_batch_size: int, gradient_accumulation_steps: int,
               world_size: int = 1, packing: bool = True) -> BatchPlan:
    """The batch plan of one epoch over examples of these token ``lengths`` (already cut to max_length)."""
    lengths = [min(n, max_length) for n in lengths]
    rows = len(packed_row_lengths(lengths, max_length)) if packing and lengths else len(lengths)
    micro_batches, steps = _steps(rows, micro_batch_size, gradient_accumulation_steps, world_size)
    _, unpacked = _steps(len(lengths), micro_batch_size, gradient_accumulation_steps, world_size)
    return BatchPlan(packing, len(lengths), rows, sum(lengths), max_length, micro_batch_size,
                     gradient_accumulation_steps, world_size, micro_batches, steps, unpacked)
