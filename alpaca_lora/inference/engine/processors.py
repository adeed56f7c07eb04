"""The engine's own logits processors, plugged into transformers' continuous batching through its documented
per-request processor classes (``ContinuousBatchingLogitsProcessor``: each request's values travel as
``add_request`` keyword arguments), and the same draws for ``model.generate``.

A seeded request samples with its own generator: its token at position ``p`` is ``argmax(scores + Gumbel noise)``
(an exact draw from ``softmax(scores)``, the Gumbel-max trick) with noise from a generator keyed by
(seed, p) alone. So its tokens do not depend on the other requests in the batch, on the batch switching from
greedy to sampling (the request is re-read as prompt + the tokens it has: the positions stay), or on the global
random generator, which the batch's own sampling keeps using for unseeded requests."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)

_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


def splitmix64(x: int) -> int:
    """A 64-bit integer hash (SplitMix64's finaliser): nearby inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def row_key(seed: int, position: int) -> int:
    """The generator key of the token drawn at ``position`` by a request with ``seed``: 32 bits, never 0 (0 means
    "not seeded"), as a signed int32 value (the processors' argument rows are int32)."""
    key = splitmix64(splitmix64(seed & _M64) ^ position) & _M32 or 1
    return key - (1 << 32) if key >= 1 << 31 else key


def gumbel_pick(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``scores`` [rows, vocab] (temperature and top_p applied), ``keys`` [rows] (0: the row is left alone). Each
    seeded row becomes one-hot: 0 at its draw, -inf elsewhere, so that the sampler can only take that token."""
    keys_list = keys.tolist()
    if not any(keys_list):
        return scores
    out = scores.clone()
    for row, key in enumerate(keys_list):
        if key:
            generator = torch.Generator(device=scores.device).manual_seed(key & _M32)
            uniform = torch.rand(scores.size(-1), generator=generator, device=scores.device)
            choice = (scores[row].float() - torch.log(-torch.log(uniform))).argmax()
            out[row].fill_(float("-inf"))[choice] = 0.0
    return out


class SeededSampler(ContinuousBatchingLogitsProcessor):
    """``add_request(..., seed=int)``: that request's draw (last in the list: after temperature and top_p)."""

    supported_kwargs = {"seed": int}
    ignored_kwargs = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        # position_offset has been moved past this step's tokens: it is the position of the token to be drawn
        return torch.tensor([0 if (seed := f.state.logit_processor_kwargs.get("seed")) is None
                             else row_key(seed, f.state.position_offset) for f in requests_with_new_token],
                            dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        return gumbel_pick(scores, tensor_arg[: scores.size(0)])


class MinTokens(ContinuousBatchingLogitsProcessor):
    """``add_request(..., min_position=len(prompt) + min_tokens)``: the end-of-sequence tokens are banned while the
    token drawn comes before that position (absolute, so it holds for a request re-read as prompt + its tokens).
    First in the list: after top_p it could remove the only token top_p kept, leaving nothing to draw."""

    supported_kwargs = {"min_position": int}
    ignored_kwargs = ()

    def __init__(self, banned_ids: set[int]):
        self.banned = torch.tensor(sorted(banned_ids), dtype=torch.long)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        return torch.tensor([int(f.state.position_offset < f.state.logit_processor_kwargs.get("min_position", 0))
                             for f in requests_with_new_token], dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        ban = tensor_arg[: scores.size(0)].bool()
        if not len(self.banned) or not ban.any():
            return scores
        scores = scores.clone()
        banned = self.banned.to(scores.device)
        scores[:, banned] = torch.where(ban[:, None], float("-inf"), scores[:, banned])
        return scores


class EngineProcessorList(ContinuousBatchingLogitsProcessorList):
    """transformers' list (per-request temperature and top_p when the batch samples, nothing when it is greedy)
    with the engine's processors before it (``first``) and after it (``last``), each with its argument row."""

    def __init__(self, sampling: bool, first: list = (), last: list = ()):
        warpers = [TemperatureLogitsWarper(0.5), TopPLogitsWarper(0.5)] if sampling else []  # each request's own
        super().__init__(LogitsProcessorList(warpers), per_request_processors=sampling)
        self.logits_processor[:0] = list(first)
        self.logits_processor.extend(last)
        self.tensors_required += len(first) + len(last)
        self._retrieve_processors_kwargs()
        self.do_processing = len(self.logits_processor) > 0


def batch_processors(sampling: bool, eos_ids: set[int]) -> EngineProcessorList:
    """The processors of a continuous batch: min_tokens first; a sampling batch draws seeded requests with their
    own generator, last."""
    return EngineProcessorList(sampling, first=[MinTokens(eos_ids)], last=[SeededSampler()] if sampling else [])


class SeededGumbel(LogitsProcessor):
    """The same seeded draw for ``model.generate`` (rows left-padded to ``padded_length``); last in the list."""

    def __init__(self, seeds: list[int | None], prompt_lengths: list[int], padded_length: int):
        self.seeds, self.prompt_lengths, self.padded_length = seeds, prompt_lengths, padded_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - self.padded_length
        keys = torch.tensor([0 if seed is None else row_key(seed, length + generated)
                             for seed, length in zip(self.seeds, self.prompt_lengths)], dtype=torch.int64)
        return gumbel_pick(scores, keys)
