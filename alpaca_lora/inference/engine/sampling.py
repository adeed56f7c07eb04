"""How one request decodes (``Sampling``): greedy or sampled, its token budget and its stop strings."""

from __future__ import annotations

from dataclasses import dataclass
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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def batchable(self) -> bool:
        """What the continuous batch does: greedy, or sampling with temperature and top_p."""
        return self.num_beams == 1 and self.repetition_penalty in (None, 1.0) and (self.greedy or not self.top_k)

    @property
    def unbatched_reason(self) -> str:
        return "beam search" if self.num_beams > 1 else "top_k" if self.top_k else "repetition_penalty"
