"""One generation engine for everything that generates: the server, the app, ``generate`` (one
instruction or a whole ``input_file``) and evaluation.

Concurrent requests share forward passes through transformers' continuous batching
(``model.init_continuous_batching()``: a background thread that puts the prompt and decode tokens
of many requests into one forward pass over a paged KV cache). Each request keeps its own
temperature, top_p, token budget and stop strings; it streams, can be cancelled at any time (its
place in the batch goes to the next waiting request at once), and ends with an error rather than
hanging if the batching thread fails (which is then restarted).

The batch decodes greedily (argmax, as ``generate``) until a request samples: sampling over the
vocabulary (softmax, a full sort for top_p, multinomial) cost a batch of 8 about a quarter of each
step on CPU, so a greedy batch does none of it. The first request that samples switches the batch
to sampling (the requests in it go on from the tokens they have, re-read as prompt); there greedy
requests are top_p 0 (only the most likely token is left); after 30 s without a sampled request an
idle batch goes back to greedy. Beam search, repetition_penalty and top_k (one more full sort per
step), and models continuous batching cannot run, are generated with ``model.generate``, one batch
at a time, while the continuous batch pauses; the log says so.

Log probabilities come from a forward pass of the model over prompt + completion (continuous
batching reports only the sampled token's probability after temperature and top-k/top-p), so they
are the model's own distribution, exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
from collections import Counter, deque
from contextlib import ExitStack, aclosing, contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm
from transformers import ContinuousBatchingConfig, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.settings import check, key

log = get_logger(__name__)

# Temperatures below this decode greedily, as in vLLM: logits divided by 1e-45 overflow to inf and nan.
GREEDY_BELOW = 1e-5
BATCHING_MODES = ("auto", "off")
DEFAULT_CACHE_TOKENS = 16384
DEFAULT_CACHE_BYTES = 2 * 1024**3
SAMPLING_KEPT_FOR = 30.0  # seconds an idle sampling batch waits for another sampled request before going greedy
_END = object()  # the last event of a request


class QueueFull(Exception):
    """Every place in the batch and in the queue is taken."""


class EngineError(Exception):
    """A request failed while generating (the message says why)."""


@dataclass
class EngineSettings:
    batching: str = key("auto", "auto: concurrent requests share forward passes (continuous batching) where the "
                                "model allows it; off: one request at a time")
    max_batch: int = key(16, "most requests generated together")
    max_queue: int = key(64, "most requests waiting for a place in the batch (the server answers 429 past that)")
    batch_tokens: int = key(512, "most tokens in one forward pass (a longer prompt is read in several)")
    cache_tokens: Optional[int] = key(None, f"KV cache size in tokens (default: max_batch full contexts, at most "
                                            f"{DEFAULT_CACHE_TOKENS} tokens or 2 GiB, at least one context)")

    def engine_checks(self) -> list[tuple[bool, str, str]]:
        return [
            (self.batching in BATCHING_MODES, "batching", f"must be one of {', '.join(BATCHING_MODES)}"),
            (self.max_batch >= 1, "max_batch", "must be at least 1"),
            (self.max_queue >= 0, "max_queue", "must be at least 0"),
            (self.batch_tokens >= 16, "batch_tokens", "must be at least 16"),
            (self.cache_tokens is None or self.cache_tokens >= 64, "cache_tokens", "must be at least 64"),
        ]


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


@dataclass
class Delta:
    """New text of a request, and the generated tokens it came from (not given in an earlier delta)."""

    text: str
    token_ids: list[int]


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at that position, most likely first


class EngineRequest:
    """One request: iterate it (``async for`` over ``deltas()`` in a server) for its text as it is
    generated. Once it has ended, ``text``, ``finish_reason`` ("stop", "length" or "cancelled"),
    ``error`` and ``completion_tokens`` are final. Stop strings are cut off the text; the tokens
    generated up to the one that completed a stop string are counted."""

    def __init__(self, engine: Engine, ident: str, prompt_ids: list[int], sampling: Sampling):
        self.engine, self.id, self.prompt_ids, self.sampling = engine, ident, prompt_ids, sampling
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.completion_tokens = 0
        self._visible_lengths = [0]  # length of the visible text after i generated tokens
        self._given = 0  # generated tokens handed out in deltas
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._done_callbacks: list[Callable[[EngineRequest], None]] = []
        self._base: list[int] = []  # tokens generated in an earlier batch (the current one continues them)
        self._done = threading.Event()
        self._lock = threading.Lock()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stops the request and frees its place at once; a request that has ended is left as it is."""
        if self._end(finish_reason="cancelled"):
            self.engine._retire(self, still_generating=True)

    def wait(self) -> EngineRequest:
        self._done.wait()
        if self.error:
            raise EngineError(self.error)
        return self

    def __iter__(self) -> Iterator[Delta]:
        try:
            while (event := self._events.get()) is not _END:
                yield event
        finally:
            self.cancel()  # no-op once ended; frees the place if the reader stops early
        if self.error:
            raise EngineError(self.error)

    async def deltas(self) -> AsyncIterator[Delta]:
        async with aclosing(follow([self])) as events:
            async for _, delta in events:
                if delta is not None:
                    yield delta

    # -- called by the engine's threads --------------------------------------------------------

    def _advance(self, token_ids: list[int], finished: bool, error: str | None = None) -> bool:
        """The tokens generated so far; True when this ended the request (the engine then frees its place)."""
        with self._lock:
            if self.done:
                return False
            if error:
                self.error = error
                return self._end_locked(None)
            tokenizer = self.engine.tokenizer
            for count in range(len(self._visible_lengths), len(token_ids)):  # tokens that came several at once
                text = self._visible(tokenizer.decode(token_ids[:count], skip_special_tokens=True))
                self._visible_lengths.append(len(text.rstrip("\ufffd")))
            self.token_ids = list(token_ids)
            raw = self._visible(tokenizer.decode(token_ids, skip_special_tokens=True))
            if len(self._visible_lengths) <= len(token_ids):
                self._visible_lengths.append(len(raw.rstrip("\ufffd")))
            piece = self._emit(raw, final=finished)
            if piece:
                self._push(Delta(piece, self._take_tokens()))
            if self.finish_reason:  # a stop string
                return self._end_locked(self.finish_reason)
            if finished:
                ended = bool(token_ids) and token_ids[-1] in self.engine.eos_ids
                return self._end_locked("stop" if ended else "length")
            return False

    def _end(self, finish_reason: str | None) -> bool:
        with self._lock:
            return False if self.done else self._end_locked(finish_reason)

    def _end_locked(self, finish_reason: str | None) -> bool:
        self.finish_reason = self.finish_reason or finish_reason
        self.completion_tokens = len(self.token_ids)
        if self._given < self._aligned(len(self.text)) and not self.error:
            self._push(Delta("", self._take_tokens()))
        self._done.set()
        self._push(_END)
        for callback in self._done_callbacks:
            callback(self)
        return True

    def _visible(self, raw: str) -> str:
        return raw.lstrip() if self.sampling.strip else raw

    def _emit(self, raw: str, final: bool) -> str:
        """The part of ``raw`` not yet given out, up to a stop string, holding back what may become one
        (and a character still incomplete)."""
        end = len(raw)
        for stop in self.sampling.stop:
            found = raw.find(stop)
            if found != -1 and found < end:
                end, self.finish_reason = found, "stop"
        if not self.finish_reason and not final:
            end -= max((n for stop in self.sampling.stop for n in range(len(stop) - 1, 0, -1)
                        if raw.endswith(stop[:n])), default=0)
            end = len(raw[:end].rstrip("\ufffd"))
        if final and not self.finish_reason and self.sampling.strip:
            end = len(raw[:end].rstrip())
        if end <= len(self.text):
            return ""
        piece, self.text = raw[len(self.text):end], raw[:end]
        return piece

    def _aligned(self, length: int) -> int:
        """How many generated tokens it takes to produce ``length`` characters of visible text."""
        count = self._given
        while count < len(self._visible_lengths) - 1 and self._visible_lengths[count] < length:
            count += 1
        return count

    def _take_tokens(self) -> list[int]:
        upto = self._aligned(len(self.text))
        taken, self._given = self.token_ids[self._given:upto], max(self._given, upto)
        return taken

    def _push(self, event) -> None:
        self._events.put(event)
        for loop, wake in list(self._watchers):
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that event loop has closed
                pass


async def follow(requests: list[EngineRequest]) -> AsyncIterator[tuple[int, Delta | None]]:
    """(index, delta) for each request's new text as it comes, and (index, None) when it ends;
    raises EngineError if one fails. Leaving early (a client that disconnected) cancels them all."""
    loop, wake = asyncio.get_running_loop(), asyncio.Event()
    for request in requests:
        request._watchers.append((loop, wake))
    open_ = set(range(len(requests)))
    try:
        while open_:
            wake.clear()
            for index in sorted(open_):
                request = requests[index]
                while True:
                    try:
                        event = request._events.get_nowait()
                    except queue.Empty:
                        break
                    if event is _END:
                        open_.discard(index)
                        if request.error:
                            raise EngineError(request.error)
                        yield index, None
                        break
                    yield index, event
            if open_:
                await wake.wait()
    finally:
        for request in requests:
            request.cancel()
            request._watchers.remove((loop, wake))


class Scorer:
    """Log probabilities of generated tokens under the model's own distribution, computed as they come:
    each call runs the model over the tokens not yet seen, reusing the KV cache of the earlier calls."""

    def __init__(self, engine: Engine, prompt_ids: list[int], top: int):
        self.engine, self.top = engine, top
        self._unseen = list(prompt_ids)
        self._cache = None

    @torch.no_grad()
    def score(self, token_ids: list[int]) -> list[TokenLogprob]:
        if not token_ids:
            return []
        engine = self.engine
        feed = self._unseen + token_ids[:-1]  # the logits after token i predict token i + 1
        with engine._model_to_myself():
            ids = torch.tensor([feed], device=engine.device)
            output = engine.model(input_ids=ids, past_key_values=self._cache, use_cache=True)
        self._cache, first = output.past_key_values, len(self._unseen) - 1
        self._unseen = token_ids[-1:]
        logprobs = torch.log_softmax(output.logits[0, first:].float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
        top_values, top_ids = logprobs.topk(self.top, dim=-1) if self.top else (logprobs[:, :0], logprobs[:, :0])
        return [TokenLogprob(token, value, list(zip(ids_.tolist(), values.tolist())))
                for token, value, ids_, values in zip(token_ids, chosen, top_ids.long(), top_values)]


class _StopWhenEnded(StoppingCriteria):
    """Ends each row of a direct generation once its request has ended (cancelled, or a stop string)."""

    def __init__(self, requests: list[EngineRequest]):
        self.requests = requests

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([r.done for r in self.requests], dtype=torch.bool, device=input_ids.device)


class _TokenStreamer(BaseStreamer):
    """Hands each new token of a direct generation to its request (stop strings are seen as they come)."""

    def __init__(self, requests: list[EngineRequest], eos_ids: set[int]):
        self.requests, self.eos_ids = requests, eos_ids
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for request, tokens, token in zip(self.requests, self.tokens, value.reshape(len(self.requests)).tolist()):
            if not tokens or tokens[-1] not in self.eos_ids:
                tokens.append(token)
                request._advance(tokens, finished=False)

    def end(self) -> None:
        pass


def _rng_kept():
    """Continuous batching seeds the process's random generators when its thread starts (``seed`` of its
    config); around the start they are put back, so an engine leaves training or sampling seeds alone."""
    return torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else [])


def _kv_bytes_per_token(model) -> int:
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


class Engine:
    """Generates for many requests at once (see the module's docstring). ``submit`` for one prompt
    (raises QueueFull past ``max_batch + max_queue`` requests), ``generate_many`` for a batch job."""

    def __init__(self, model, tokenizer, settings: EngineSettings | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings = settings or EngineSettings()
        check(settings.engine_checks())
        self.device = model.device
        self.eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        text_config = model.config.get_text_config()
        self.vocab_size = text_config.vocab_size
        positions = getattr(text_config, "max_position_embeddings", None) or DEFAULT_CACHE_TOKENS
        self.start_token = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, 0) if t is not None))
        self.cache_tokens = settings.cache_tokens or max(positions, min(
            settings.max_batch * positions, DEFAULT_CACHE_TOKENS, DEFAULT_CACHE_BYTES // _kv_bytes_per_token(model)))
        self.capacity = settings.max_batch + settings.max_queue
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[str, EngineRequest] = {}
        self._pending = 0
        self._ended: Counter[str] = Counter()  # requests that have ended, by finish reason
        self._closed = False
        self._warned: set[str] = set()
        self._direct: queue.SimpleQueue = queue.SimpleQueue()
        self._own_attention = getattr(model.config, "_attn_implementation", None)
        self._manager = None  # the continuous batch (None while it is being replaced)
        self._samples = False  # whether it samples (else it is greedy: argmax)
        self._want_sampling = False  # a request that samples waits for the switch
        self._last_sampled = 0.0
        self.batching_off = None  # why continuous batching is off, when it is
        if settings.batching == "off":
            self.batching_off = "batching=off"
        elif not hasattr(model, "init_continuous_batching"):
            self.batching_off = f"{type(model).__name__} has no continuous batching"
        else:
            started = threading.Event()
            # A daemon thread starts the batching thread, which so is a daemon too: an engine nobody
            # closed cannot keep the process from exiting.
            threading.Thread(target=self._dispatch, args=(started,), daemon=True, name="engine-dispatch").start()
            started.wait()
        if self.batching_off and settings.batching != "off":
            log.warning("continuous batching is off (%s): requests are generated one at a time", self.batching_off)
        self.context_length = min(positions, self.cache_tokens) if self.batching_off is None else positions
        threading.Thread(target=self._generate_directly_loop, daemon=True, name="engine-direct").start()

    @property
    def description(self) -> str:
        s = self.settings
        if self.batching_off is None:
            attention = getattr(self.model.config, "_attn_implementation", "?")
            return (f"continuous batching: up to {s.max_batch} requests share each forward pass (at most "
                    f"{s.batch_tokens} tokens, {attention} attention, KV cache of {self.cache_tokens} tokens), "
                    f"{s.max_queue} more may wait; greedy until a request samples; beam search, top_k and "
                    "repetition_penalty run alone")
        return f"one request at a time ({self.batching_off}), {self.capacity - 1} more may wait"

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], sampling: Sampling, n: int = 1) -> list[EngineRequest]:
        """``n`` requests for one prompt, all admitted or none (QueueFull)."""
        return self._enqueue([prompt_ids] * n, sampling, check_capacity=True)

    def generate_many(self, prompts: list[list[int]], sampling: Sampling,
                      progress: str | None = None) -> Iterator[tuple[int, EngineRequest]]:
        """(index, finished request) for each prompt, in the order they finish; a batch job is never
        refused (it waits for places). Leaving early cancels the rest."""
        finished: queue.SimpleQueue = queue.SimpleQueue()
        requests = self._enqueue(prompts, sampling, check_capacity=False, on_done=finished.put)
        index = {id(request): i for i, request in enumerate(requests)}
        try:
            for _ in tqdm(range(len(requests)), desc=progress, disable=progress is None, unit="answer"):
                request = finished.get()
                if request.error:
                    raise EngineError(request.error)
                yield index[id(request)], request
        finally:
            for request in requests:
                request.cancel()

    def scorer(self, prompt_ids: list[int], top: int) -> Scorer:
        return Scorer(self, self.prompt_ids(prompt_ids), top)

    def prompt_ids(self, prompt_ids: list[int]) -> list[int]:
        """The tokens a prompt is generated from: an empty prompt starts a new document (BOS, else EOS)."""
        return list(prompt_ids) or [self.start_token]

    @property
    def closed(self) -> bool:
        return self._closed

    def status(self) -> dict:
        with self._lock:
            return {"status": "stopped" if self._closed else "ok", "batching": self.description,
                    "generating": len(self._running), "waiting": len(self._waiting),
                    "alone": self._pending - len(self._running) - len(self._waiting), "places": self.capacity,
                    "sampling_batch": self._samples, "ended": dict(self._ended)}

    def _enqueue(self, prompts: list[list[int]], sampling: Sampling, check_capacity: bool,
                 on_done: Callable | None = None) -> list[EngineRequest]:
        requests = [EngineRequest(self, f"r{next(self._ids)}", self.prompt_ids(p), sampling) for p in prompts]
        for request in requests:
            request._done_callbacks += [on_done] if on_done else []
        with self._lock:
            if self._closed:
                raise EngineError("the engine has stopped")
            if check_capacity and self._pending + len(requests) > self.capacity:
                raise QueueFull(f"all {self.capacity} places are taken ({self.settings.max_batch} generating, "
                                f"{self.settings.max_queue} waiting); try again shortly")
            self._pending += len(requests)
            if self.batching_off is None and sampling.batchable:
                self._waiting.extend(requests)
                self._fill()
                return requests
        if self.batching_off is None:
            self._warn_once(f"{sampling.unbatched_reason} is not continuously batched: such requests are "
                            "generated alone, pausing the batch")
        step = 1 if check_capacity else self.settings.max_batch  # a batch job goes in padded batches
        for start in range(0, len(requests), step):
            self._direct.put(requests[start:start + step])
        return requests

    def _fill(self) -> None:
        """Moves waiting requests into the batch while it has places (called holding the lock). A request
        that samples waits for the dispatcher to switch a greedy batch to sampling."""
        while self._manager is not None and self._waiting and len(self._running) < self.settings.max_batch:
            request = self._waiting[0]
            if request.done:
                self._waiting.popleft()
                continue
            s = request.sampling
            if not s.greedy:
                if not self._samples:
                    self._want_sampling = True
                    return
                self._last_sampled = time.monotonic()
            if self._manager.background_thread_status.can_accept_new_requests() is not None:
                return  # the batching thread has failed: the dispatcher replaces it, then refills
            base = list(request.token_ids)  # a request moved from an earlier batch goes on from its tokens
            accepted = self._manager.add_request(request.prompt_ids + base, request_id=request.id,
                                                 max_new_tokens=s.max_new_tokens - len(base), streaming=True,
                                                 eos_token_id=sorted(self.eos_ids) or -1, **self._batch_kwargs(s))
            if accepted is None:  # the batching thread is stopping: the dispatcher restarts it and refills
                return
            self._waiting.popleft()
            request._base = base
            self._running[request.id] = request

    def _retire(self, request: EngineRequest, still_generating: bool = False) -> None:
        """A request ended: its place goes to the next one (at once: a request still in the batch is
        dropped from it before the next forward pass)."""
        with self._lock:
            self._pending -= 1
            self._ended["failed" if request.error else request.finish_reason] += 1
            if self._running.pop(request.id, None) is not None:
                if still_generating and not self._closed:
                    self._manager.cancel_request(request.id)
            elif request in self._waiting:
                self._waiting.remove(request)
            if not self._closed:
                self._fill()

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)

    # -- the continuous batch ----------------------------------------------------------------------

    def _batch_kwargs(self, sampling: Sampling) -> dict:
        """A request's own sampling settings, for a batch that samples (a greedy batch takes none)."""
        if not self._samples:
            return {}
        if sampling.greedy:  # only the most likely token is left: argmax
            return {"temperature": 1.0, "top_p": 0.0}
        return {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p)}

    def _new_manager(self, sampling: bool):
        """A started continuous batch (greedy: argmax, no sampling over the vocabulary at all), checked
        with one token for a one-token prompt, so that a model it cannot run fails here, not later."""
        s = self.settings
        generation_config = GenerationConfig(  # placeholders: each request brings its own values
            do_sample=sampling, temperature=0.5 if sampling else None, top_k=None, top_p=0.5 if sampling else None,
            max_new_tokens=1, eos_token_id=sorted(self.eos_ids) or -1, pad_token_id=self.tokenizer.pad_token_id)
        batching_config = ContinuousBatchingConfig(
            per_request_processors=sampling, max_requests_per_batch=s.max_batch, max_batch_tokens=s.batch_tokens,
            num_blocks=math.ceil(self.cache_tokens / ContinuousBatchingConfig.page_size), seed=0)
        manager = None
        try:
            with _rng_kept():
                manager = self.model.init_continuous_batching(generation_config=generation_config,
                                                              continuous_batching_config=batching_config)
                manager.start()
                self._samples = sampling
                manager.add_request([self.start_token], request_id="warm-up", max_new_tokens=1,
                                    **self._batch_kwargs(Sampling(max_new_tokens=1)))
                while (output := manager.get_result(timeout=1)) is None or not output.is_finished():
                    if output is None and not manager.is_running():
                        raise RuntimeError(str(manager.background_thread_status.fatal_error or "it stopped"))
                if output.error:
                    raise RuntimeError(output.error)
        except BaseException:
            self._stop_manager(manager)
            raise
        return manager

    def _dispatch(self, started: threading.Event) -> None:
        """Starts continuous batching, then hands each of its outputs to its request; restarts the batch
        if its thread dies, and switches it between greedy and sampling as requests need."""
        try:
            with self._model_lock:
                manager = self._new_manager(sampling=False)
        except Exception as exc:  # noqa: BLE001 - any failure means: generate without it
            self.batching_off = f"continuous batching failed to start: {type(exc).__name__}: {exc}"
            started.set()
            return
        self._manager = manager
        started.set()
        while not self._closed:
            output = manager.get_result(timeout=0.1)
            if output is not None:
                with self._lock:
                    request = self._running.get(output.request_id)
                if request is not None and request._advance(request._base + output.generated_tokens,
                                                            output.is_finished(), output.error):
                    self._retire(request, still_generating=not output.is_finished())
                if not self._want_sampling:
                    continue
            if self._closed:
                return
            if not manager.is_running():
                manager = self._replace(manager, sampling=self._samples, failed=True)
            elif self._want_sampling:
                manager = self._replace(manager, sampling=True)
            elif (self._samples and not self._running and not self._waiting
                  and time.monotonic() - self._last_sampled > SAMPLING_KEPT_FOR):
                manager = self._replace(manager, sampling=False)
            if manager is None:
                return

    def _replace(self, old, sampling: bool, failed: bool = False):
        """A new batch in place of ``old``: after a failure (its requests have failed), or to switch between
        greedy and sampling (its requests go on in the new batch from the tokens they have)."""
        with self._model_lock:  # no direct use of the model while no batch is paused
            with self._lock:
                self._manager, self._want_sampling = None, False
                moving, self._running = list(self._running.values()), {}
            reason = f"generation failed: {old.background_thread_status.fatal_error}"
            if failed:
                log.error("continuous batching stopped (%s); the requests it held have failed; restarting it", reason)
            else:
                log.info("switching the continuous batch to %s", "sampling" if sampling else "greedy")
            self._stop_manager(old)
            try:
                new = self._new_manager(sampling)
            except Exception as exc:  # noqa: BLE001
                log.error("continuous batching could not restart (%s): requests are generated one at a time", exc)
                new, failed, reason = None, True, f"continuous batching could not restart: {exc}"
            to_direct, to_finish = [], []
            with self._lock:
                self._manager = new
                if new is None:
                    self.batching_off = "continuous batching failed"
                    to_direct, self._waiting = list(self._waiting), deque()
                else:
                    if not failed:
                        go_on = [r for r in moving if r.sampling.max_new_tokens > len(r.token_ids)]
                        to_finish = [r for r in moving if r not in go_on]  # its last token never reached us
                        self._waiting.extendleft(reversed(go_on))
                    self._fill()
        for request in moving if failed else to_finish:
            if request._advance(request.token_ids, True, error=reason if failed else None):
                self._retire(request)
        for request in to_direct:
            self._direct.put([request])
        return new

    @staticmethod
    def _stop_manager(manager) -> None:
        if manager is not None:
            try:
                manager.stop(block=True, timeout=30, hard_stop=True)
                manager.destroy()
            except Exception as exc:  # noqa: BLE001 - stopping is best effort
                log.warning("stopping continuous batching: %s", exc)

    # -- generation outside the batch --------------------------------------------------------------

    @contextmanager
    def _model_to_myself(self):
        """The model for a direct forward pass: the continuous batch pauses (and, if it switched the
        attention implementation, the model's own is back) until the block ends."""
        with self._model_lock, ExitStack() as stack:
            manager = self._manager
            if manager is not None and manager.is_running():
                try:
                    stack.enter_context(manager.pause())
                except RuntimeError:  # the batching thread ended while we waited: nothing to pause
                    pass
            batching_attention = getattr(self.model.config, "_attn_implementation", None)
            if self._own_attention and batching_attention != self._own_attention:
                self.model.set_attn_implementation(self._own_attention)
                stack.callback(self.model.set_attn_implementation, batching_attention)
            yield

    def _generate_directly_loop(self) -> None:
        while (batch := self._direct.get()) is not None:
            requests = [r for r in batch if not r.done]
            if requests:
                self._generate_directly(requests)

    def _generate_directly(self, requests: list[EngineRequest]) -> None:
        """``model.generate`` for requests continuous batching does not take, left-padded together."""
        s, tokenizer = requests[0].sampling, self.tokenizer
        padded = tokenizer.pad({"input_ids": [r.prompt_ids for r in requests]}, padding_side="left",
                               return_tensors="pt").to(self.device)
        kwargs = {"max_new_tokens": s.max_new_tokens, "num_beams": s.num_beams, "do_sample": not s.greedy,
                  "temperature": None, "top_p": None, "top_k": None, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": tokenizer.eos_token_id,
                  "stopping_criteria": StoppingCriteriaList([_StopWhenEnded(requests)])}
        if not s.greedy and s.num_beams == 1:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        if s.num_beams > 1:
            kwargs["early_stopping"] = True
        else:
            kwargs["streamer"] = _TokenStreamer(requests, self.eos_ids)
        if s.repetition_penalty is not None:
            kwargs["repetition_penalty"] = s.repetition_penalty
        try:
            with self._model_to_myself(), torch.no_grad():
                output = self.model.generate(**padded, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the requests fail, the engine goes on
            log.exception("generation failed")
            for request in requests:
                if request._advance(request.token_ids, True, error=f"generation failed: {type(exc).__name__}: {exc}"):
                    self._retire(request)
            return
        for request, row in zip(requests, output[:, padded["input_ids"].shape[1]:].tolist()):
            ends = [i for i, token in enumerate(row) if token in self.eos_ids]
            if request._advance(row[:ends[0] + 1] if ends else row, finished=True):
                self._retire(request)

    # -- the end -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Ends every request (as cancelled) and stops the batching thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            requests = list(self._running.values()) + list(self._waiting)
        for request in requests:
            request._end("cancelled")
        self._stop_manager(self._manager)
        self._manager = None
        self._direct.put(None)


def generate_texts(model, tokenizer, prompts: list[list[int]], sampling: Sampling, max_batch: int = 16,
                   progress: str | None = None) -> list[str]:
    """Responses to token-id prompts through a temporary engine: the batch API for code that holds a
    model rather than a LoadedModel (evaluation during training, tests)."""
    was_training = model.training
    texts: list[str] = [""] * len(prompts)
    try:
        with Engine(model, tokenizer, EngineSettings(max_batch=max_batch, max_queue=0)) as engine:
            for index, request in engine.generate_many(prompts, sampling, progress):
                texts[index] = request.text
    finally:
        model.train(was_training)
    return texts
