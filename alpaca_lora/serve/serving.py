"""The serving logic, without HTTP (as vLLM's ``serving_completion.py``): ``OpenAIServing.prepare`` checks a request
and works out the prompt's tokens and the sampling (or raises an APIError naming the field at fault);
``respond`` submits it to the generation engine and gives a ``ResponseBuilder``, which builds OpenAI's answer
as a whole or as server-sent events."""

from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

from alpaca_lora.data.templates import ConversationError
from alpaca_lora.inference.engine import (
    Delta,
    Engine,
    EngineError,
    EngineRequest,
    EngineStopped,
    QueueFull,
    Sampling,
    Scorer,
    TokenBytes,
    TokenLogprob,
    follow,
)
from alpaca_lora.inference.loading import LoadedModel
from alpaca_lora.serve.protocol import (
    STREAM_OPTIONS,
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
    """The conversation rendered as the model was trained (``LoadedModel.chat_prompt``); a message it cannot
    render is a 400 naming it."""
    texts = [{"role": m.role, "content": _text(m.content, f"messages[{i}].content")} for i, m in enumerate(messages)]
    try:
        return loaded.chat_prompt(texts)
    except ConversationError as exc:
        raise APIError(400, str(exc), "messages" if exc.index is None else f"messages[{exc.index}].role") from None


@dataclass
class Prompt:
    ids: list[int]  # what the model reads
    text: str  # what echo shows: the string as given, or the token ids decoded


@dataclass
class PreparedRequest:
    """A request checked and turned into what the engine takes."""

    request: SamplingRequest
    chat: bool
    prompts: list[Prompt]
    sampling: Sampling  # max_new_tokens 0: nothing is generated (echo alone)
    top: int | None  # top logprobs per token; None: no logprobs
    echo: bool = False


class OpenAIServing:
    """Both endpoints' logic over the model's generation engine."""

    def __init__(self, loaded: LoadedModel, engine: Engine, model_id: str, default_max_tokens: int):
        self.loaded, self.engine, self.model_id, self.default_max_tokens = loaded, engine, model_id, default_max_tokens
        self.format = LogprobsFormat(loaded.tokenizer)

    def prepare(self, request: SamplingRequest) -> PreparedRequest:
        """The prompts' tokens and the request's sampling, or an APIError naming the field at fault."""
        chat = isinstance(request, ChatRequest)
        self._check_fields(request)
        if chat:
            prompts = [self._prompt(chat_prompt(self.loaded, request.messages), "messages")]
        else:
            forms = request.prompts()
            prompts = [self._prompt(p, "prompt" if len(forms) == 1 else f"prompt[{i}]") for i, p in enumerate(forms)]
        sampling = self._sampling(request, prompts, chat)
        if chat and request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if chat:
            top = (request.top_logprobs or 0) if request.logprobs else None
            return PreparedRequest(request, chat, prompts, sampling, top)
        return PreparedRequest(request, chat, prompts, sampling, request.logprobs, request.echo)

    def _check_fields(self, request: SamplingRequest) -> None:
        if request.model != self.model_id:
            raise APIError(404, f"model '{request.model}' is not served here; this server serves '{self.model_id}'",
                           "model", "not_found_error")
        for name, neutral in UNSUPPORTED.items():
            if name in (request.model_extra or {}) and not neutral(request.model_extra[name]):
                raise APIError(400, f"'{name}' is not supported by this server", name)
        for name, value in (request.stream_options or {}).items():
            if name not in STREAM_OPTIONS or (name != "include_usage" and not STREAM_OPTIONS[name](value)):
                raise APIError(400, f"stream_options.{name} is not supported by this server (include_usage is)",
                               f"stream_options.{name}")
        if (where := lone_surrogate(request.model_dump(exclude_none=True))) is not None:
            raise APIError(400, f"{where}: the text holds a lone surrogate (invalid UTF-16 in the JSON string)", where)
        if isinstance(request.stop, list) and len(request.stop) > 4:
            raise APIError(400, "at most 4 stop sequences", "stop")

    def _prompt(self, prompt: str | list[int], where: str) -> Prompt:
        """A string encoded as training encodes it (with the start token), or token ids exactly as given."""
        if isinstance(prompt, str):
            return Prompt(self.engine.prompt_ids(self.loaded.encode(prompt)), prompt)
        vocabulary = self.engine.vocab_size
        if (bad := next((t for t in prompt if not 0 <= t < vocabulary), None)) is not None:
            raise APIError(400, f"token id {bad} is not in the model's vocabulary (0 to {vocabulary - 1})", where)
        return Prompt(list(prompt), self.loaded.tokenizer.decode(prompt))

    def _sampling(self, request: SamplingRequest, prompts: list[Prompt], chat: bool) -> Sampling:
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        greedy = Sampling(1, temperature=request.temperature).greedy
        wanted = len(prompts) * (1 if greedy else request.n)  # greedy: each prompt's answer is generated once
        if wanted > self.engine.capacity:
            raise APIError(400, f"{len(prompts)} prompts x n={request.n} are more requests than this server holds at "
                                f"once ({self.engine.capacity}: max_batch + max_queue)", "prompt")
        max_tokens = self._max_tokens(request, prompts, chat)
        if request.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({request.min_tokens}) is more than max_tokens ({max_tokens})",
                           "min_tokens")
        return Sampling(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                        stop=tuple(s for s in stop if s), strip=chat, seed=request.seed, ignore_eos=request.ignore_eos,
                        min_tokens=request.min_tokens)

    def _max_tokens(self, request: SamplingRequest, prompts: list[Prompt], chat: bool) -> int:
        """The completion's token budget: as asked, or the default shrunk to what the context leaves (0: echo)."""
        context = self.engine.context_length
        asked = request.max_completion_tokens if chat and request.max_completion_tokens else request.max_tokens
        if asked == 0 and not getattr(request, "echo", False):
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo: the prompt's log probabilities)",
                           "max_tokens")
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i].ids))
        tokens = len(prompts[longest].ids)
        max_tokens = min(self.default_max_tokens, context - tokens) if asked is None else asked
        if (max_tokens < 1 and asked != 0) or tokens + max_tokens > context:
            what = "messages" if chat else "prompt" if len(prompts) == 1 else f"prompt[{longest}]"
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{tokens + max(max_tokens, 0)} tokens ({tokens} in the {what}, "
                                f"{max(max_tokens, 0)} in the completion). Please reduce the length of the messages "
                                "or completion.", what, code="context_length_exceeded")
        return max_tokens

    def respond(self, prepared: PreparedRequest) -> ResponseBuilder:
        """Submits the request to the engine (429 when it is full); the answer is built as it generates. Choice
        ``p * n + j`` is prompt p's j-th (as OpenAI numbers them)."""
        n, sampling = prepared.request.n, prepared.sampling
        generating = sampling.max_new_tokens > 0
        copies = n if sampling.greedy or not generating else 1  # greedy gives one answer: generate it once
        jobs = [(p.ids, sampling.for_choice(j)) for p in prepared.prompts for j in range(n // copies)]
        try:
            requests = self.engine.submit_all(jobs) if generating else [None] * len(jobs)
        except QueueFull as exc:
            raise APIError(429, str(exc), kind="rate_limit_error", code="rate_limit_exceeded") from None
        except EngineError as exc:
            raise engine_failure(exc) from None
        slots = [Slot(prepared.prompts[k // (n // copies)], request, [k * copies + c for c in range(copies)],
                      None if prepared.top is None else self.engine.scorer(jobs[k][0], prepared.top))
                 for k, request in enumerate(requests)]
        return ResponseBuilder(self.format, self.model_id, prepared, slots)


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
        """A completion token's text; a piece of a character (not UTF-8 on its own) is ``bytes:\\xNN...`` as in
        OpenAI's answers, so that two such pieces never share a name in ``top_logprobs``."""
        if self.token_bytes.is_special(token_id):
            return self.tokenizer.decode([token_id])
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def chat(self, entries: list[TokenLogprob]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:  # a piece of a character: its real bytes say it
            return {"token": self.tokenizer.decode([token_id]), "logprob": logprob,
                    "bytes": list(self.token_bytes(token_id))}

        return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def completion(self, entries: list[TokenLogprob], text: codecs.IncrementalDecoder) -> dict:
        """The columns; ``text`` decodes the bytes of the choice's tokens so far (text_offset counts its characters:
        a special token adds none, a token that ends inside a character counts up to that character)."""
        offsets = []
        for e in entries:
            offsets.append(text.chars)
            if not self.token_bytes.is_special(e.token_id):
                text.chars += len(text.decode(self.token_bytes(e.token_id)))
        return {"tokens": [self.token(e.token_id) for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.top is None else {**{self.token(t): lp for t, lp in e.top},
                                                             self.token(e.token_id): e.logprob} for e in entries],
                "text_offset": offsets}


@dataclass
class Slot:
    """One engine request of an answer (None: nothing to generate) and the choices it gives."""

    prompt: Prompt
    request: EngineRequest | None
    choices: list[int]
    scorer: Scorer | None
    text: codecs.IncrementalDecoder = field(default_factory=lambda: _Characters())


class _Characters(codecs.getincrementaldecoder("utf-8")):
    """UTF-8 decoding that counts the whole characters it gave (for text_offset)."""

    def __init__(self):
        super().__init__(errors="replace")
        self.chars = 0


class ResponseBuilder:
    """One API answer over the engine's requests (``slots``), whole or as server-sent events."""

    def __init__(self, format: LogprobsFormat, model_id: str, prepared: PreparedRequest, slots: list[Slot]):
        self.format, self.prepared, self.slots, self.chat = format, prepared, slots, prepared.chat
        self.include_usage = bool((prepared.request.stream_options or {}).get("include_usage"))
        self.ident = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.head = {"id": self.ident, "created": int(time.time()), "model": model_id}
        self.requests = [slot.request for slot in slots if slot.request is not None]

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.prepared.prompts)
        completion = sum(len(slot.choices) * slot.request.completion_tokens for slot in self.slots if slot.request)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _logprobs(self, slot: Slot, segments: list[Delta], echo: bool = False) -> dict | None:
        """The logprobs of these deltas' tokens, in order (each scored after its context); ``echo``: the prompt's."""
        if slot.scorer is None:
            return None
        entries = await asyncio.to_thread(slot.scorer.score_prompt) if echo else []
        for delta in segments:
            entries += await asyncio.to_thread(slot.scorer.score, delta.token_ids, delta.context_ids)
        return self.format.chat(entries) if self.chat else self.format.completion(entries, slot.text)

    async def _segments(self) -> list[list[Delta]]:
        """Each slot's deltas once its request has ended (raises EngineError if one failed), those that follow
        on joined (one forward pass to score them)."""
        segments: list[list[Delta]] = [[] for _ in self.slots]
        slot_of = [i for i, slot in enumerate(self.slots) if slot.request is not None]
        async with aclosing(follow(self.requests)) as events:
            async for index, delta in events:
                own = segments[slot_of[index]]
                if delta is None:
                    continue
                if own and not delta.context_ids:
                    own[-1] = Delta("", own[-1].token_ids + delta.token_ids, own[-1].context_ids)
                else:
                    own.append(delta)
        return segments

    async def whole(self) -> dict:
        """The answer once every request has ended (raises EngineError if one failed)."""
        echo, choices = self.prepared.echo, []
        for slot, segments in zip(self.slots, await self._segments()):
            logprobs = await self._logprobs(slot, segments, echo)
            text = (slot.prompt.text if echo else "") + (slot.request.text if slot.request else "")
            finish = slot.request.finish_reason if slot.request else "length"
            for index in slot.choices:
                choice = {"index": index, "finish_reason": finish, "logprobs": logprobs}
                choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
                choices.append(choice)
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion",
                "choices": sorted(choices, key=lambda c: c["index"]), "usage": self.usage()}

    def _chunk(self, slot: Slot, text: str | None, finish_reason: str | None = None, logprobs=None,
               first: bool = False) -> str:
        choices = []
        for index in slot.choices:
            if self.chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choices.append({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            else:
                choices.append({"index": index, "text": text or "", "logprobs": logprobs,
                                "finish_reason": finish_reason})
        return self._event(choices)

    def _event(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion", "choices": choices}
        if self.include_usage:  # as OpenAI: null in every chunk but the last
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def events(self):
        """Server-sent events in OpenAI's chunk format, then ``data: [DONE]``; a failure is an error event."""
        try:
            for slot in self.slots:
                if self.chat:
                    yield self._chunk(slot, None, first=True)
                if self.prepared.echo:
                    yield self._chunk(slot, slot.prompt.text, logprobs=await self._logprobs(slot, [], echo=True))
            slot_of = [slot for slot in self.slots if slot.request is not None]
            async with aclosing(follow(self.requests)) as events:
                async for index, delta in events:
                    slot = slot_of[index]
                    if delta is None:
                        yield self._chunk(slot, None, slot.request.finish_reason)
                    elif delta.text or slot.scorer:
                        yield self._chunk(slot, delta.text, logprobs=await self._logprobs(slot, [delta]))
            for slot in self.slots:
                if slot.request is None:  # echo alone: it ends at once
                    yield self._chunk(slot, None, "length")
            if self.include_usage:
                yield self._event([], self.usage())
        except EngineError as exc:
            yield f"data: {json.dumps(engine_failure(exc).body())}\n\n"
        yield "data: [DONE]\n\n"
