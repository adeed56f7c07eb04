"""The serving logic, without HTTP (as vLLM's ``serving_completion.py``): ``OpenAIServing.prepare`` checks a request
and works out the prompt's tokens and the sampling (or raises an APIError naming the field at fault);
``respond`` submits it to the generation engine and gives a ``ResponseBuilder``, which builds OpenAI's answer
as a whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

from alpaca_lora.inference.engine import (
    Delta,
    Engine,
    EngineError,
    EngineRequest,
    EngineStopped,
    QueueFull,
    Sampling,
    TokenBytes,
    TokenLogprob,
    follow,
)
from alpaca_lora.inference.loading import LoadedModel
from alpaca_lora.serve.protocol import (
    UNSUPPORTED,
    APIError,
    ChatMessage,
    ChatRequest,
    SamplingRequest,
    lone_surrogate,
)


def _text(content: str | list[dict], where: str) -> str:
    if isinstance(content, str):
        return content
    if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
        raise APIError(400, "only text content parts are supported", where)
    return "".join(part["text"] for part in content)


def chat_prompt(loaded: LoadedModel, messages: list[ChatMessage]) -> str:
    """The last user message is the instruction; the rest is context in the template's input."""
    *earlier, last = messages
    if last.role != "user":
        raise APIError(400, "the last message must have role 'user'", f"messages[{len(messages) - 1}].role")
    context = []
    for i, message in enumerate(earlier):
        text = _text(message.content, f"messages[{i}].content")
        context.append(text if message.role in ("system", "developer") else f"{message.role.capitalize()}: {text}")
    return loaded.prompt(_text(last.content, f"messages[{len(messages) - 1}].content"), "\n\n".join(context))


@dataclass
class PreparedRequest:
    """A request checked and turned into what the engine takes."""

    request: SamplingRequest
    chat: bool
    prompt_ids: list[int]
    sampling: Sampling
    top: int | None  # top logprobs per token; None: no logprobs


class OpenAIServing:
    """Both endpoints' logic over the model's generation engine."""

    def __init__(self, loaded: LoadedModel, engine: Engine, model_id: str, default_max_tokens: int):
        self.loaded, self.engine, self.model_id, self.default_max_tokens = loaded, engine, model_id, default_max_tokens

    def prepare(self, request: SamplingRequest) -> PreparedRequest:
        """The prompt's tokens and the request's sampling, or an APIError naming the field at fault."""
        chat = isinstance(request, ChatRequest)
        self._check_fields(request)
        prompt = chat_prompt(self.loaded, request.messages) if chat else request.prompt
        prompt_ids = self.engine.prompt_ids(self.loaded.encode(prompt))
        max_tokens = self._max_tokens(request, len(prompt_ids), chat)
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        sampling = Sampling(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                            stop=tuple(s for s in stop if s), strip=chat, seed=request.seed)
        if chat and request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if chat:
            top = (request.top_logprobs or 0) if request.logprobs else None
        else:
            top = request.logprobs
        return PreparedRequest(request, chat, prompt_ids, sampling, top)

    def _check_fields(self, request: SamplingRequest) -> None:
        if request.model != self.model_id:
            raise APIError(404, f"model '{request.model}' is not served here; this server serves '{self.model_id}'",
                           "model", "not_found_error")
        for name, neutral in UNSUPPORTED.items():
            if name in (request.model_extra or {}) and not neutral(request.model_extra[name]):
                raise APIError(400, f"'{name}' is not supported by this server", name)
        if (where := lone_surrogate(request.model_dump(exclude_none=True))) is not None:
            raise APIError(400, f"{where}: the text holds a lone surrogate (invalid UTF-16 in the JSON string)", where)
        if isinstance(request.stop, list) and len(request.stop) > 4:
            raise APIError(400, "at most 4 stop sequences", "stop")

    def _max_tokens(self, request: SamplingRequest, prompt_tokens: int, chat: bool) -> int:
        """The completion's token budget: as asked, or the default shrunk to what the context leaves."""
        context = self.engine.context_length
        asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
        max_tokens = asked or min(self.default_max_tokens, context - prompt_tokens)
        if max_tokens < 1 or prompt_tokens + max_tokens > context:
            what = "messages" if chat else "prompt"
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{prompt_tokens + max(max_tokens, 0)} tokens ({prompt_tokens} in the {what}, "
                                f"{max(max_tokens, 0)} in the completion). Please reduce the length of the messages "
                                "or completion.", what, code="context_length_exceeded")
        return max_tokens

    def respond(self, prepared: PreparedRequest) -> ResponseBuilder:
        """Submits the request to the engine (429 when it is full); the answer is built as it generates."""
        request, sampling = prepared.request, prepared.sampling
        copies = request.n if sampling.greedy else 1  # greedy gives one answer: generate it once
        try:
            requests = self.engine.submit(prepared.prompt_ids, sampling, n=request.n // copies)
        except QueueFull as exc:
            raise APIError(429, str(exc), kind="rate_limit_error", code="rate_limit_exceeded") from None
        except EngineError as exc:
            raise engine_failure(exc) from None
        scorers = None if prepared.top is None else [self.engine.scorer(prepared.prompt_ids, prepared.top)
                                                     for _ in requests]
        return ResponseBuilder(self.loaded, self.model_id, prepared.chat, requests, copies, scorers,
                               request.stream_options)


def engine_failure(exc: EngineError) -> APIError:
    """A request the engine failed: 503 while the server shuts down (try again elsewhere or later), else 500."""
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc), kind="server_error", code="server_shutting_down")
    return APIError(500, str(exc), kind="server_error")


class LogprobsFormat:
    """OpenAI's logprobs objects for scored tokens: chat's ``content`` list (each token with its own ``bytes``),
    or the completions' columns (``text_offset`` in characters of the text, counted on the tokens' bytes)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.token_bytes = tokenizer, TokenBytes(tokenizer)

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat(self, entries: list[TokenLogprob]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self.token(token_id), "logprob": logprob, "bytes": list(self.token_bytes(token_id))}

        return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def completion(self, entries: list[TokenLogprob], offset: bytes = b"") -> dict:
        """The columns; ``offset``: the bytes of the text before these tokens (an earlier chunk's)."""
        offsets, seen = [], offset
        for e in entries:
            offsets.append(len(seen.decode("utf-8", errors="ignore")))  # whole characters before the token
            seen += b"" if self.token_bytes.is_special(e.token_id) else self.token_bytes(e.token_id)
        return {"tokens": [self.token(e.token_id) for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{**{self.token(t): lp for t, lp in e.top}, self.token(e.token_id): e.logprob}
                                 for e in entries], "text_offset": offsets}


class ResponseBuilder:
    """One API answer over the engine's requests: choice ``i`` is request ``i // copies``."""

    def __init__(self, loaded: LoadedModel, model_id: str, chat: bool, requests: list[EngineRequest], copies: int,
                 scorers, stream_options: dict | None):
        self.loaded, self.chat, self.requests, self.copies, self.scorers = loaded, chat, requests, copies, scorers
        self.include_usage = bool((stream_options or {}).get("include_usage"))
        self.format = LogprobsFormat(loaded.tokenizer)
        self._scored_bytes = [b"" for _ in requests]  # the bytes of each request's tokens scored so far
        self.ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.head = {"id": self.ident, "created": int(time.time()), "model": model_id}

    async def _logprobs(self, index: int, segments: list[Delta]) -> dict | None:
        """The logprobs of these deltas' tokens, in order (each scored after its context)."""
        if self.scorers is None:
            return None
        entries = []
        for delta in segments:
            entries += await asyncio.to_thread(self.scorers[index].score, delta.token_ids, delta.context_ids)
        if self.chat:
            return self.format.chat(entries)
        before, self._scored_bytes[index] = self._scored_bytes[index], self._scored_bytes[index] + b"".join(
            self.format.token_bytes(e.token_id) for e in entries if not self.format.token_bytes.is_special(e.token_id))
        return self.format.completion(entries, before)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    def usage(self) -> dict:
        prompt = self.requests[0].prompt_tokens
        completion = sum(r.completion_tokens for r in self.requests) * self.copies
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self) -> dict:
        """The answer once every request has ended (raises EngineError if one failed)."""
        segments: list[list[Delta]] = [[] for _ in self.requests]
        async with aclosing(follow(self.requests)) as events:
            async for index, delta in events:
                if delta is None:
                    continue
                if segments[index] and not delta.context_ids:  # one forward pass for what follows on
                    segments[index][-1] = Delta("", segments[index][-1].token_ids + delta.token_ids,
                                                segments[index][-1].context_ids)
                else:
                    segments[index].append(delta)
        choices = []
        for index, request in enumerate(self.requests):
            logprobs = await self._logprobs(index, segments[index])
            for copy in range(self.copies):
                choice = {"index": index * self.copies + copy, "finish_reason": request.finish_reason,
                          "logprobs": logprobs}
                choice.update({"message": {"role": "assistant", "content": request.text}} if self.chat
                              else {"text": request.text})
                choices.append(choice)
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion", "choices": choices,
                "usage": self.usage()}

    def _chunk(self, index: int, text: str | None, finish_reason: str | None = None, logprobs=None,
               first: bool = False) -> str:
        choices = []
        for copy in range(self.copies):
            if self.chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": index * self.copies + copy, "delta": delta, "logprobs": logprobs,
                          "finish_reason": finish_reason}
            else:
                choice = {"index": index * self.copies + copy, "text": text or "", "logprobs": logprobs,
                          "finish_reason": finish_reason}
            choices.append(choice)
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps({**self.head, 'object': kind, 'choices': choices})}\n\n"

    async def events(self):
        """Server-sent events in OpenAI's chunk format, then ``data: [DONE]``; a failure is an error event."""
        try:
            if self.chat:
                for index in range(len(self.requests)):
                    yield self._chunk(index, None, first=True)
            async with aclosing(follow(self.requests)) as events:
                async for index, delta in events:
                    if delta is None:
                        yield self._chunk(index, None, self.requests[index].finish_reason)
                    elif delta.text or self.scorers:
                        yield self._chunk(index, delta.text, logprobs=await self._logprobs(index, [delta]))
            if self.include_usage:
                body = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion",
                        "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(body)}\n\n"
        except EngineError as exc:
            yield f"data: {json.dumps(engine_failure(exc).body())}\n\n"
        yield "data: [DONE]\n\n"
