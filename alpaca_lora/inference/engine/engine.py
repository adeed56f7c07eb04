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

import itertools
import math
import queue
import threading
import time
from collections import Counter, deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm
from transformers import ContinuousBatchingConfig, GenerationConfig

from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.settings import check, key
from alpaca_lora.inference.engine.detokenizer import Detokenizer
from alpaca_lora.inference.engine.direct import generate_directly
from alpaca_lora.inference.engine.errors import EngineStopped, PromptTooLong, QueueFull
from alpaca_lora.inference.engine.processors import batch_processors
from alpaca_lora.inference.engine.request import EngineRequest
from alpaca_lora.inference.engine.sampling import Sampling
from alpaca_lora.inference.engine.scoring import Scorer

log = get_logger(__name__)

BATCHING_MODES = ("auto", "off")
DEFAULT_CACHE_TOKENS = 16384
DEFAULT_CACHE_BYTES = 2 * 1024**3
SAMPLING_KEPT_FOR = 30.0  # seconds an idle sampling batch waits for another sampled request before going greedy


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
        self._base: dict[str, list[int]] = {}  # tokens a request had from an earlier batch (the current one goes on)
        self._pending = 0
        self._ended: Counter[str] = Counter()  # requests that have ended, by finish reason
        self._closed = False
        self._stopping: str | None = None  # why no request is taken any more
        self._open: set[EngineRequest] = set()  # every request not ended yet
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
        """``n`` requests for one prompt, all admitted or none (QueueFull); seeded, each its own seed."""
        return self.submit_all([(prompt_ids, sampling.for_choice(i)) for i in range(n)])

    def submit_all(self, jobs: list[tuple[list[int], Sampling]]) -> list[EngineRequest]:
        """A request for each (prompt, sampling) pair (samplings that differ at most in their seeds), all admitted
        or none: QueueFull, or PromptTooLong for a prompt the context cannot hold."""
        return self._enqueue(jobs, check_capacity=True)

    def generate_many(self, prompts: list[list[int]], sampling: Sampling, progress: str | None = None,
                      raise_errors: bool = True) -> Iterator[tuple[int, EngineRequest]]:
        """(index, finished request) for each prompt, in the order they finish; a batch job is never
        refused (it waits for places). A request that failed (a prompt longer than the context, say) raises
        its error, or with ``raise_errors=False`` is given like the others, its ``error`` saying why: the rest
        go on. Leaving early cancels the rest."""
        finished: queue.SimpleQueue = queue.SimpleQueue()
        requests = self._enqueue([(p, sampling) for p in prompts], check_capacity=False, on_done=finished.put)
        index = {id(request): i for i, request in enumerate(requests)}
        try:
            for _ in tqdm(range(len(requests)), desc=progress, disable=progress is None, unit="answer"):
                request = finished.get()
                if raise_errors:
                    request.raise_failure()
                yield index[id(request)], request
        finally:
            for request in requests:
                request.cancel()

    def scorer(self, prompt_ids: list[int], top: int) -> Scorer:
        return Scorer(self._forward_alone, self.prompt_ids(prompt_ids), top)

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

    def _enqueue(self, jobs: list[tuple[list[int], Sampling]], check_capacity: bool,
                 on_done: Callable | None = None) -> list[EngineRequest]:
        """Requests for (prompt, sampling) pairs that differ at most in their seeds. A prompt the context cannot
        hold is never admitted: ``submit`` (``check_capacity``) raises PromptTooLong, a batch job's request
        fails with it at once."""
        def ended(request: EngineRequest, still_generating: bool) -> None:
            self._retire(request, still_generating)
            if on_done is not None:
                on_done(request)

        requests = [EngineRequest(f"r{next(self._ids)}", self.prompt_ids(p), s,
                                  Detokenizer(self.tokenizer, s.stop, s.strip, s.min_tokens),
                                  set() if s.ignore_eos else self.eos_ids, ended) for p, s in jobs]
        too_long = {id(r): PromptTooLong(f"the prompt is {r.prompt_tokens} tokens, longer than the model's context "
                                         f"of {self.context_length} tokens allows (it must leave room for a token "
                                         "to be generated); nothing was generated")
                    for r in requests if r.prompt_tokens >= self.context_length}
        if too_long and check_capacity:
            raise next(iter(too_long.values()))
        for request in requests:  # as far as the context allows
            request.max_new_tokens = min(request.sampling.max_new_tokens, self.context_length - request.prompt_tokens)
        self._admit([r for r in requests if id(r) not in too_long], check_capacity, len(requests))
        for request in requests:
            if id(request) in too_long:
                request._fail(too_long[id(request)])
        return requests

    def _admit(self, requests: list[EngineRequest], check_capacity: bool, count: int) -> None:
        """Counts ``count`` requests in (QueueFull past the capacity) and queues ``requests``: to the batch,
        or to be generated alone."""
        sampling = requests[0].sampling if requests else None
        with self._lock:
            if self._stopping:
                raise EngineStopped(self._stopping)
            if check_capacity and self._pending + count > self.capacity:
                raise QueueFull(f"all {self.capacity} places are taken ({self.settings.max_batch} generating, "
                                f"{self.settings.max_queue} waiting); try again shortly")
            self._pending += count
            self._open.update(requests)
            if not requests or (self.batching_off is None and sampling.batchable):
                self._waiting.extend(requests)
                self._fill()
                return
        if self.batching_off is None:
            self._warn_once(f"{sampling.unbatched_reason} is not continuously batched: such requests are "
                            "generated alone, pausing the batch")
        step = 1 if check_capacity else self.settings.max_batch  # a batch job goes in padded batches
        for start in range(0, len(requests), step):
            self._direct.put(requests[start:start + step])

    def _fill(self) -> None:
        """Moves waiting requests into the batch while it has places (called holding the lock). A request
        that samples waits for the dispatcher to switch a greedy batch to sampling."""
        while (self._manager is not None and not self._stopping and self._waiting
               and len(self._running) < self.settings.max_batch):
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
                                                 max_new_tokens=request.max_new_tokens - len(base), streaming=True,
                                                 eos_token_id=sorted(request.eos_ids) or -1,
                                                 **self._batch_kwargs(s, request.prompt_tokens))
            if accepted is None:  # the batching thread is stopping: the dispatcher restarts it and refills
                return
            self._waiting.popleft()
            self._base[request.id] = base
            self._running[request.id] = request

    def _retire(self, request: EngineRequest, still_generating: bool = False) -> None:
        """A request ended: its place goes to the next one (at once: a request still in the batch is
        dropped from it before the next forward pass)."""
        with self._lock:
            self._pending -= 1
            self._open.discard(request)
            self._ended["failed" if request.error else request.finish_reason] += 1
            self._base.pop(request.id, None)
            if self._running.pop(request.id, None) is not None:
                if still_generating and not self._closed and self._manager is not None:
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

    def _batch_kwargs(self, sampling: Sampling, prompt_tokens: int = 1) -> dict:
        """A request's own settings for the batch's processors: min_tokens always, the sampling ones in a batch
        that samples (a greedy batch takes none)."""
        kwargs = {"min_position": prompt_tokens + sampling.min_tokens} if sampling.min_tokens else {}
        if not self._samples:
            return kwargs
        if sampling.greedy:  # only the most likely token is left: argmax
            return {**kwargs, "temperature": 1.0, "top_p": 0.0}
        seeded = {} if sampling.seed is None else {"seed": sampling.seed}
        return {**kwargs, "temperature": float(sampling.temperature), "top_p": float(sampling.top_p), **seeded}

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
                manager.logit_processor = batch_processors(sampling, self.eos_ids)  # read when it starts
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
                if request is not None:
                    request._advance(self._base.get(request.id, []) + output.generated_tokens, output.is_finished(),
                                     output.error)
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
                        go_on = [r for r in moving if r.max_new_tokens > len(r.token_ids)]
                        to_finish = [r for r in moving if r not in go_on]  # its last token never reached us
                        self._waiting.extendleft(reversed(go_on))
                    self._fill()
        for request in moving if failed else to_finish:
            request._advance(request.token_ids, True, error=reason if failed else None)
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
                generate_directly(self.model, self.tokenizer, requests, self._model_to_myself)

    def _forward_alone(self, input_ids: list[int], cache, logits_to_keep: int = 0):
        """One forward pass of the model outside the batch (a Scorer's), extending ``cache``; the logits of the last
        ``logits_to_keep`` positions (0: all)."""
        with self._model_to_myself(), torch.no_grad():
            ids = torch.tensor([input_ids], device=self.device)
            return self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep)

    # -- the end -----------------------------------------------------------------------------------

    def abort(self, message: str) -> None:
        """Ends every open request with ``EngineStopped(message)`` and takes no new one (a server shutting down
        answers them at once, instead of waiting for them); ``close()`` then stops the threads."""
        with self._lock:
            self._stopping = message
            requests = list(self._open)
        for request in requests:
            request._fail(EngineStopped(message))

    def close(self) -> None:
        """Ends every request still open (cancelled) and stops the engine's threads."""
        with self._lock:
            if self._closed:
                return
            self._stopping = self._stopping or "the engine has stopped"
            requests = list(self._open)
        for request in requests:
            request._fail(EngineStopped(self._stopping))
        with self._lock:
            self._closed = True
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
