"""How one request decodes (``Sampling``): greedy or sampled, its token budget and its stop strings."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

# Temperatures below this decode greedily, as in vLLM: logits divided by 1e-45 overflow to inf and nan.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Sampling:
    """How one request decodes. A temperature of 0 (below 1e-5) is greedy; top_k 0 is off."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: Optional[float] = None
    stop: tuple[str, ...] = ()
    strip: bool = True  # a response to a template prompt; a raw continuation (strip=False) keeps its spaces
    seed: Optional[int] = None  # sampling draws from a generator of its own: same seed, same prompt, same text
    ignore_eos: bool = False  # the end-of-sequence token does not end it: it goes on to max_new_tokens
    min_tokens: int = 0  # no end-of-sequence token (nor stop string) before this many tokens

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def batchable(self) -> bool:
        """What the continuous batch does: greedy, or sampling with temperature and top_p."""
        return self.num_beams == 1 and self.repetition_penalty in (None, 1.0) and (self.greedy or not self.top_k)

    def for_choice(self, index: int) -> Sampling:
        """The sampling of choice ``index`` of n for one prompt: choice 0 is this one, the others get seeds of
        their own derived from it (else n seeded choices would be n copies of one)."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed * 0x9E3779B97F4A7C15 + index) & 0xFFFFFFFFFFFFFFFF)

    @property
    def unbatched_reason(self) -> str:
        return "beam search" if self.num_beams > 1 else "top_k" if self.top_k else "repetition_penalty"
