"""Requests continuous batching does not take (beam search, repetition_penalty, top_k), generated with
``model.generate``, left-padded together, each token handed to its request as it comes."""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from alpaca_lora.common.logs import get_logger
from alpaca_lora.inference.engine.processors import SeededGumbel
from alpaca_lora.inference.engine.request import EngineRequest

log = get_logger(__name__)


class _StopWhenEnded(StoppingCriteria):
    """Ends each row of a direct generation once its request has ended (cancelled, or a stop string)."""

    def __init__(self, requests: list[EngineRequest]):
        self.requests = requests

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([r.done for r in self.requests], dtype=torch.bool, device=input_ids.device)


class _TokenStreamer(BaseStreamer):
    """Hands each new token of a direct generation to its request (stop strings are seen as they come)."""

    def __init__(self, requests: list[EngineRequest]):
        self.requests = requests
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for request, tokens, token in zip(self.requests, self.tokens, value.reshape(len(self.requests)).tolist()):
            if len(tokens) < request.max_new_tokens and (not tokens or tokens[-1] not in request.eos_ids):
                tokens.append(token)
                request._advance(tokens, finished=False)

    def end(self) -> None:
        pass


def seeded_warpers(requests: list[EngineRequest], padded_length: int) -> LogitsProcessorList:
    """Temperature, top_k and top_p, then the seeded draw (generate's own warpers would come after it)."""
    s = requests[0].sampling
    warpers = [TemperatureLogitsWarper(s.temperature)] + ([TopKLogitsWarper(s.top_k)] if s.top_k else [])
    warpers += [TopPLogitsWarper(s.top_p)] if s.top_p < 1 else []
    return LogitsProcessorList(warpers + [SeededGumbel([r.sampling.seed for r in requests],
                                                       [len(r.prompt_ids) for r in requests], padded_length)])


def generation_kwargs(requests: list[EngineRequest], tokenizer, padded_length: int) -> dict:
    """``model.generate``'s settings for requests that share one Sampling (but their seeds): all spelled out, so
    that a model's generation_config cannot change them."""
    s = requests[0].sampling
    kwargs = {"max_new_tokens": max(r.max_new_tokens for r in requests), "num_beams": s.num_beams,
              "do_sample": not s.greedy, "temperature": None, "top_p": None, "top_k": None,
              "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": None if s.ignore_eos else tokenizer.eos_token_id, "min_new_tokens": s.min_tokens or None,
              "stopping_criteria": StoppingCriteriaList([_StopWhenEnded(requests)])}
    if not s.greedy and s.num_beams == 1 and any(r.sampling.seed is not None for r in requests):
        kwargs.update(temperature=1.0, top_p=1.0, top_k=0, logits_processor=seeded_warpers(requests, padded_length))
    elif not s.greedy and s.num_beams == 1:
        kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    if s.num_beams > 1:
        kwargs["early_stopping"] = True
    else:
        kwargs["streamer"] = _TokenStreamer(requests)
    if s.repetition_penalty is not None:
        kwargs["repetition_penalty"] = s.repetition_penalty
    return kwargs


def generate_directly(model, tokenizer, requests: list[EngineRequest], model_to_myself) -> None:
    """Generates ``requests`` with ``model.generate`` (inside ``model_to_myself()``: the batch pauses); each
    ends as its tokens say, or with the error if generation fails (the engine goes on)."""
    padded = tokenizer.pad({"input_ids": [r.prompt_ids for r in requests]}, padding_side="left",
                           return_tensors="pt").to(model.device)
    try:
        with model_to_myself(), torch.no_grad():
            kwargs = generation_kwargs(requests, tokenizer, padded["input_ids"].shape[1])
            output = model.generate(**padded, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the requests fail, the engine goes on
        log.exception("generation failed")
        for request in requests:
            request._advance(request.token_ids, True, error=f"generation failed: {type(exc).__name__}: {exc}")
        return
    for request, row in zip(requests, output[:, padded["input_ids"].shape[1]:].tolist()):
        row = row[:request.max_new_tokens]
        ends = [i for i, token in enumerate(row) if token in request.eos_ids]
        request._advance(row[:ends[0] + 1] if ends else row, finished=True)
