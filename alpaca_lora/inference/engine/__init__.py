"""One generation engine for everything that generates: the server, the app, ``generate`` and evaluation (see
``engine.py``). Its parts: ``sampling`` (how a request decodes), ``detokenizer`` (tokens to text, cut at stop
strings), ``request`` (one request, streamed), ``scoring`` (log probabilities), ``direct`` (what continuous
batching does not take) and ``engine`` (the continuous batch and its queue)."""

from alpaca_lora.inference.engine.detokenizer import Detokenizer, TokenBytes
from alpaca_lora.inference.engine.engine import Engine, EngineSettings, generate_texts
from alpaca_lora.inference.engine.errors import EngineError, EngineStopped, PromptTooLong, QueueFull
from alpaca_lora.inference.engine.request import Delta, EngineRequest, follow
from alpaca_lora.inference.engine.sampling import GREEDY_BELOW, Sampling
from alpaca_lora.inference.engine.scoring import Scorer, TokenLogprob

__all__ = ["GREEDY_BELOW", "Delta", "Detokenizer", "Engine", "EngineError", "EngineRequest", "EngineSettings",
           "EngineStopped", "PromptTooLong", "QueueFull", "Sampling", "Scorer", "TokenBytes", "TokenLogprob", "follow",
           "generate_texts"]
