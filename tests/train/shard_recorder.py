"""A TrainerCallback for the multi-process tests, loaded through the ``callbacks=`` key: each rank
writes the token ids of the examples in its shard of the first epoch to $SHARD_RECORD_DIR/rank-N.json."""

import json
import os

from transformers import TrainerCallback


def examples_in(batch) -> list[list[int]]:
    """The examples of a batch, without padding: padded rows (an attention mask), or packed rows whose sequences
    restart their position ids (a row's padding is a last sequence with no trained label)."""
    if "attention_mask" in batch:
        return [[t for t, keep in zip(ids, mask) if keep]
                for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())]
    examples = []
    for ids, positions, labels in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(),
                                      batch["labels"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        examples += [ids[a:b] for a, b in zip(starts, starts[1:]) if any(label != -100 for label in labels[a:b])]
    return examples


class ShardRecorder(TrainerCallback):
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        seen = [example for batch in train_dataloader for example in examples_in(batch)]
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(os.environ["SHARD_RECORD_DIR"], f"rank-{rank}.json"), "w") as f:
            json.dump({"world_size": args.world_size, "examples": seen}, f)
