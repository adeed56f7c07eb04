"""The one place that knows how a local model answers instructions, so that ``answer`` follows the
shared generation layer by changing this file alone.

The boundary: ``LocalModel(settings, batch_size)`` loads the model; calling it with records
(``instruction``, ``input``; or a conversation, ``messages``, the user's last) and a :class:`Decoding`
yields ``(position, response text, error)`` for each record as it finishes, each prompted as the model was
trained; ``error`` says why a record got no answer (its prompt longer than the model's context), else None.
Today the model's generation engine answers them, ``batch_size`` at a time (continuous batching; beam search and
repetition_penalty go one at a time, as the engine decides).
"""

from __future__ import annotations

from typing import Iterator

from alpaca_lora.inference.engine import EngineSettings
from alpaca_lora.inference.generation import Decoding
from alpaca_lora.inference.loading import InferenceModel, load_for_inference


class LocalModel:
    def __init__(self, settings: InferenceModel, batch_size: int):
        self.loaded = load_for_inference(settings)
        self.engine = self.loaded.engine(EngineSettings(max_batch=batch_size))  # its KV cache sized for the batch
        self.name = self.loaded.name
        self.description = self.loaded.description

    def __call__(self, records: list[dict], decoding: Decoding) -> Iterator[tuple[int, str, str | None]]:
        prompts = [self.loaded.encode(self.loaded.chat_prompt(r["messages"]) if "messages" in r else
                                      self.loaded.prompt(r["instruction"], r["input"])) for r in records]
        for position, request in self.engine.generate_many(prompts, decoding.sampling(), raise_errors=False):
            yield position, request.text, (str(request.error) if request.error else None)
