"""Log probabilities of generated tokens under the model's own distribution (``Scorer``): continuous batching
reports only the sampled token's probability after temperature and top-k/top-p, so a forward pass of the model
over prompt + completion gives the real ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at that position, most likely first


class Scorer:
    """Scores tokens as they come: each call runs the model over the tokens not yet seen, reusing the KV cache of
    the earlier calls. ``forward(input_ids, cache)`` runs the model (the engine pauses its batch meanwhile)."""

    def __init__(self, forward: Callable, prompt_ids: list[int], top: int):
        self.forward, self.top = forward, top
        self._unseen = list(prompt_ids)
        self._cache = None

    @torch.no_grad()
    def score(self, token_ids: list[int], context: list[int] = ()) -> list[TokenLogprob]:
        """The entries of ``token_ids``, which follow ``context`` (tokens read, not scored)."""
        if not token_ids:
            self._unseen += list(context)
            return []
        feed = self._unseen + list(context) + token_ids[:-1]  # the logits after token i predict token i + 1
        output = self.forward(feed, self._cache)
        self._cache, first = output.past_key_values, len(self._unseen) + len(context) - 1
        self._unseen = token_ids[-1:]
        logprobs = torch.log_softmax(output.logits[0, first:].float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
        top_values, top_ids = logprobs.topk(self.top, dim=-1) if self.top else (logprobs[:, :0], logprobs[:, :0])
        return [TokenLogprob(token, value, list(zip(ids_.tolist(), values.tolist())))
                for token, value, ids_, values in zip(token_ids, chosen, top_ids.long(), top_values)]
