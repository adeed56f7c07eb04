"""A TrainerCallback for the multi-process tests, loaded through the ``callbacks=`` key: each rank
writes the token ids of the examples in its shard of the first epoch to $SHARD_RECORD_DIR/rank-N.json."""

import json
import os

from transformers import TrainerCallback


class ShardRecorder(TrainerCallback):
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        seen = []
        for batch in train_dataloader:
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
                seen.append([t for t, keep in zip(ids, mask) if keep])  # the example, without padding
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(os.environ["SHARD_RECORD_DIR"], f"rank-{rank}.json"), "w") as f:
            json.dump({"world_size": args.world_size, "examples": seen}, f)
