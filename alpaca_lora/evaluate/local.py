"""The one place that knows how a local model answers a batch of instructions, so that ``answer`` can
move to the shared batching engine by changing this file alone.

The boundary: ``LocalModel(settings)`` loads the model; calling it with records (``instruction``,
``input``) and a :class:`Decoding` returns one response text per record.
"""

from __future__ import annotations

from alpaca_lora.inference import Decoding, InferenceModel, generate_batch, load_for_inference


class LocalModel:
    def __init__(self, settings: InferenceModel, batch_size: int):
        self.loaded = load_for_inference(settings)
        self.batch_size = batch_size
        self.name = self.loaded.name
        self.description = self.loaded.description

    def __call__(self, records: list[dict], decoding: Decoding) -> list[str]:
        kwargs = decoding.generate_kwargs()
        max_new_tokens = kwargs.pop("max_new_tokens")
        prompts = [self.loaded.prompt(record["instruction"], record["input"]) for record in records]
        return generate_batch(self.loaded.model, self.loaded.tokenizer, prompts, max_new_tokens,
                              batch_size=self.batch_size, **kwargs)
