"""Decoding chosen explicitly (``Decoding``: a setting with no effect in its mode is an error), one streamed
generation on the model's engine (``Generation``), and the batch API for code that holds a model
(``generate_batch``)."""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Optional

from alpaca_lora.common.settings import check, key
from alpaca_lora.data.templates import encode_prompt
from alpaca_lora.inference.engine import EngineRequest, Sampling, generate_texts
from alpaca_lora.inference.loading import LoadedModel

DECODING_MODES = ("greedy", "sample", "beam")


_ONLY_IN = {"temperature": "sample", "top_p": "sample", "top_k": "sample", "num_beams": "beam"}


@dataclass
class Decoding:
    """Decoding is chosen, not inferred: a setting that has no effect in the mode is an error."""

    decoding: str = key("greedy", "greedy, sample (temperature, top_p, top_k) or beam (num_beams)")
    max_new_tokens: int = key(256, "most tokens to generate")
    temperature: Optional[float] = key(None, "sampling temperature (decoding=sample; default 1.0)")
    top_p: Optional[float] = key(None, "nucleus sampling: smallest token set with this probability (decoding=sample)")
    top_k: Optional[int] = key(None, "sample among the k most likely tokens (decoding=sample)")
    num_beams: Optional[int] = key(None, "beams (decoding=beam; default 4)")
    repetition_penalty: Optional[float] = key(None, "penalise repeated tokens (>1), in any mode")

    def validate(self) -> None:
        checks = [(self.decoding in DECODING_MODES, "decoding", f"must be one of {', '.join(DECODING_MODES)}")]
        checks += [(getattr(self, name) is None or self.decoding == mode, name,
                    f"has no effect with decoding={self.decoding}; use decoding={mode} or leave {name} unset")
                   for name, mode in _ONLY_IN.items()]
        checks += [
            (self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
            (self.temperature is None or self.temperature > 0, "temperature", "must be positive"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k is None or self.top_k >= 1, "top_k", "must be at least 1"),
            (self.num_beams is None or self.num_beams >= 2, "num_beams", "must be at least 2"),
            (self.repetition_penalty is None or self.repetition_penalty > 0, "repetition_penalty", "must be positive"),
        ]
        check(checks)

    def sampling(self, stop_strings: list[str] | None = None, strip: bool = True) -> Sampling:
        """Every generation setting spelled out, so a model's generation_config cannot change the mode."""
        sample = self.decoding == "sample"
        return Sampling(max_new_tokens=self.max_new_tokens, temperature=(self.temperature or 1.0) if sample else 0.0,
                        top_p=(self.top_p or 1.0) if sample else 1.0, top_k=(self.top_k or 0) if sample else 0,
                        num_beams=(self.num_beams or 4) if self.decoding == "beam" else 1,
                        repetition_penalty=self.repetition_penalty, stop=tuple(s for s in stop_strings or () if s),
                        strip=strip)


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16,
                   progress: str | None = None, decoding: Decoding | None = None, encode=None) -> list[str]:
    """Responses to ``prompts`` (greedy unless ``decoding`` says otherwise), ``batch_size`` generated together
    by a generation engine: the batch API for code that holds a model (evaluation, during training too).
    ``encode`` turns a prompt into ids (a ``Prompter``'s; default: ``encode_prompt``)."""
    sampling = (decoding or Decoding(max_new_tokens=max_new_tokens)).sampling()
    encode = encode or (lambda prompt: encode_prompt(tokenizer, prompt))
    return generate_texts(model, tokenizer, [encode(p) for p in prompts], sampling, batch_size, progress)


class Generation:
    """One generation on the model's engine, streamed: iterating (or ``async for``) yields new response
    text as it comes (beam search: all at the end). It ends at EOS, at ``max_new_tokens``, at a stop
    string (not included in the text), or at ``cancel()`` (also when the reader stops early); then
    ``text``, ``finish_reason`` ("stop" or "length") and token counts are known."""

    def __init__(self, loaded: LoadedModel, prompt: str, decoding: Decoding, stop_strings: list[str] | None = None,
                 strip: bool = True):
        self.loaded, self.sampling = loaded, decoding.sampling(stop_strings, strip)
        self.prompt_ids = loaded.encode(prompt)
        self.request: EngineRequest | None = None

    def _start(self) -> EngineRequest:
        if self.request is None:
            self.request = self.loaded.engine().submit(self.prompt_ids, self.sampling)[0]
        return self.request

    def __iter__(self) -> Iterator[str]:
        for delta in self._start():
            yield delta.text

    async def __aiter__(self) -> AsyncIterator[str]:
        async with aclosing(self._start().deltas()) as deltas:
            async for delta in deltas:
                yield delta.text

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()

    @property
    def text(self) -> str:
        return self.request.text if self.request else ""

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason if self.request else None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return self.request.completion_tokens if self.request else 0


