"""Log probabilities under the model's own distribution (``Scorer``): continuous batching reports only the sampled
token's probability after temperature and top-k/top-p, so a forward pass of the model over prompt + completion
gives the real ones, the prompt's own tokens' too (OpenAI's ``echo``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

CHUNK = 256  # positions per log_softmax: [CHUNK, vocabulary] floats at a time, never [prompt length, vocabulary]


@dataclass
class TokenLogprob:
    token_id: int
    logprob: Optional[float]  # None for a prompt's first token: nothing predicts it
    top: Optional[list[tuple[int, float]]]  # the most likely tokens at that position, most likely first


def _entries(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    """The entry of ``targets[i]`` under ``logits[i]`` (the logits that predict it), in chunks of positions."""
    entries = []
    for start in range(0, len(targets), CHUNK):
        logprobs = torch.log_softmax(logits[start:start + CHUNK].float(), dim=-1)
        ids = targets[start:start + CHUNK]
        chosen = logprobs.gather(1, torch.tensor(ids, device=logprobs.device)[:, None])[:, 0].tolist()
        if top:
            values, top_ids = logprobs.topk(top, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
        else:
            tops = [[] for _ in ids]
        entries += [TokenLogprob(t, lp, tp) for t, lp, tp in zip(ids, chosen, tops)]
    return entries


class Scorer:
    """Scores tokens as they come: each call runs the model over the tokens not yet read, reusing the KV cache of
    the earlier calls. ``forward(input_ids, cache, logits_to_keep)`` runs the model (the engine pauses its batch
    meanwhile) and returns its output, with the extended ``cache``."""

    def __init__(self, forward: Callable, prompt_ids: list[int], top: int):
        self.forward, self.top = forward, top
        self._unseen = list(prompt_ids)
        self._cache = None

    def _logits(self, input_ids: list[int], keep: int) -> torch.Tensor:
        """The logits of the last ``keep`` positions (0: all of them), reading ``input_ids`` after the cache."""
        output = self.forward(input_ids, self._cache, keep)
        self._cache = output.cache
        return output.logits[0]

    @torch.no_grad()
    def score_prompt(self) -> list[TokenLogprob]:
        """The prompt's own entries: its first token's without a logprob, then each token's under those before it.
        Called before ``score`` (the prompt's last token is read with the completion)."""
        prompt, self._unseen = self._unseen, self._unseen[-1:]
        first = TokenLogprob(prompt[0], None, None)
        if len(prompt) < 2:
            return [first]
        return [first, *_entries(self._logits(prompt[:-1], keep=0), prompt[1:], self.top)]

    @torch.no_grad()
    def score(self, token_ids: list[int], context: list[int] = ()) -> list[TokenLogprob]:
        """The entries of ``token_ids``, which follow ``context`` (tokens read, not scored)."""
        if not token_ids:
            self._unseen += list(context)
            return []
        feed = self._unseen + list(context) + token_ids[:-1]  # the logits after token i predict token i + 1
        self._unseen = token_ids[-1:]
        return _entries(self._logits(feed, keep=len(token_ids)), token_ids, self.top)
