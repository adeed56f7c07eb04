"""One request to the engine (``EngineRequest``): its text as it is generated, read as an iterator, awaited with
``follow`` or waited for; cancelling ends it at once. It knows nothing of the engine: the engine hands it
tokens (``_advance``) and hears of its end through the ``on_end`` callback it was given."""

from __future__ import annotations

import asyncio
import queue
import threading
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from alpaca_lora.inference.engine.detokenizer import Detokenizer
from alpaca_lora.inference.engine.errors import EngineError
from alpaca_lora.inference.engine.sampling import Sampling

_END = object()  # the last event of a request


@dataclass
class Delta:
    """New text of a request, and the generated tokens it came from (not given in an earlier delta).
    ``context_ids``: tokens generated just before those that are not part of the text (a response's leading
    whitespace, stripped): a Scorer still reads them."""

    text: str
    token_ids: list[int]
    context_ids: list[int] = field(default_factory=list)


class EngineRequest:
    """One request: iterate it (``async for`` over ``deltas()`` in a server) for its text as it is
    generated. Once it has ended, ``text``, ``finish_reason`` ("stop", "length" or "cancelled"),
    ``error`` and ``completion_tokens`` are final. Stop strings are cut off the text; the tokens
    generated up to the one that completed a stop string are counted.

    ``on_end(request, still_generating)`` is called once, when it ends: ``still_generating`` when the
    engine may still be generating it (cancelled, or a stop string), so that its place is freed."""

    def __init__(self, ident: str, prompt_ids: list[int], sampling: Sampling, detokenizer: Detokenizer,
                 eos_ids: set[int], on_end: Callable[[EngineRequest, bool], None]):
        self.id, self.prompt_ids, self.sampling, self.eos_ids = ident, prompt_ids, sampling, eos_ids
        self.max_new_tokens = sampling.max_new_tokens  # the engine lowers it to what the context leaves
        self.detokenizer, self.on_end = detokenizer, on_end
        self.finish_reason: str | None = None
        self.failure: EngineError | None = None  # what ended it, if it failed
        self.completion_tokens = 0
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._done = threading.Event()
        self._lock = threading.Lock()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def token_ids(self) -> list[int]:
        """The tokens generated so far."""
        return self.detokenizer.token_ids

    @property
    def text(self) -> str:
        """The text handed out so far (all of it once the request has ended)."""
        return self.detokenizer.text

    @property
    def error(self) -> str | None:
        """Why it failed, if it did."""
        return None if self.failure is None else str(self.failure)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise type(self.failure)(str(self.failure))

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stops the request and frees its place at once; a request that has ended is left as it is."""
        with self._lock:
            if not self.done:
                self._end_locked("cancelled", still_generating=True)

    def wait(self) -> EngineRequest:
        self._done.wait()
        self.raise_failure()
        return self

    def __iter__(self) -> Iterator[Delta]:
        try:
            while (event := self._events.get()) is not _END:
                yield event
        finally:
            self.cancel()  # no-op once ended; frees the place if the reader stops early
        self.raise_failure()

    async def deltas(self) -> AsyncIterator[Delta]:
        async with aclosing(follow([self])) as events:
            async for _, delta in events:
                if delta is not None:
                    yield delta

    # -- called by the engine's threads --------------------------------------------------------

    def _advance(self, token_ids: list[int], finished: bool, error: str | None = None) -> None:
        """The tokens generated so far (``finished``: all of them), or the error that ended the request."""
        with self._lock:
            if self.done:
                return
            if error:
                self.failure = EngineError(error)
                self._end_locked(None, still_generating=False)
                return
            before = self.detokenizer.given
            piece, ids, stopped = self.detokenizer.feed(token_ids[len(self.token_ids):], final=finished)
            if piece or ids:
                self._push(Delta(piece, ids, self.token_ids[before:self.detokenizer.given - len(ids)]))
            if stopped:
                self._end_locked(stopped, still_generating=not finished)
            elif finished:
                ended = bool(token_ids) and token_ids[-1] in self.eos_ids
                self._end_locked("stop" if ended else "length", still_generating=False)

    def _fail(self, failure: EngineError) -> None:
        """Ends the request with this error (the engine stops generating it)."""
        with self._lock:
            if not self.done:
                self.failure = failure
                self._end_locked(None, still_generating=True)

    def _end_locked(self, finish_reason: str | None, still_generating: bool) -> None:
        self.finish_reason = self.finish_reason or finish_reason
        self.completion_tokens = len(self.token_ids)
        self._done.set()
        self._push(_END)
        self.on_end(self, still_generating)

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
                        request.raise_failure()
                        yield index, None
                        break
                    yield index, event
            if open_:
                await wake.wait()
    finally:
        for request in requests:
            request.cancel()
            request._watchers.remove((loop, wake))
