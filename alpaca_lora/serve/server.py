"""An OpenAI-compatible HTTP API for a fine-tuned model:
``alpaca-lora serve [adapter=DIR] [model=DIR] [port=8000] [api_key_env=NAME]``

``/v1/chat/completions`` renders the conversation as the model was trained (alpaca_lora.data.templates): for a
model trained on conversations, turn by turn; for one trained on single instructions, the last message (from
the user) is the instruction and system messages and earlier turns become the template's input, as a
transcript (``User: ...``, ``Assistant: ...``). ``/v1/completions`` continues a raw prompt as is.

Requests share the model through the generation engine (alpaca_lora.inference.engine): concurrent requests
are generated together, each with its own sampling settings, stop strings and max_tokens; a client
that disconnects frees its place at once; past ``max_batch + max_queue`` requests the server
answers 429. ``logprobs`` (and up to 5 ``top_logprobs``) are the model's own distribution.
Endpoints never block the event loop, so ``/v1/models`` and ``/health`` answer under any load.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.common.settings import check, entry_point, help_text, key
from alpaca_lora.data.templates import ConversationError
from alpaca_lora.inference.engine import Engine, EngineError, EngineRequest, EngineSettings, QueueFull, Sampling, follow
from alpaca_lora.inference.loading import InferenceModel, LoadedModel, load_for_inference, load_inference_settings

TOOL = "serve"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_TOP_LOGPROBS = 5

# OpenAI parameters this server does not implement: sent with an effect, they are refused, not ignored.
UNSUPPORTED = {
    "tools": lambda v: not v, "functions": lambda v: not v, "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"), "response_format": lambda v: v in (None, {"type": "text"}),
    "logit_bias": lambda v: not v, "presence_penalty": lambda v: not v, "frequency_penalty": lambda v: not v,
    "echo": lambda v: not v, "best_of": lambda v: v in (None, 1), "suffix": lambda v: not v,
}


@dataclass
class ServeConfig(EngineSettings, InferenceModel):
    host: str = key("127.0.0.1", "interface to bind (0.0.0.0 exposes the server to the network); on loopback, "
                                 "only requests addressed to a loopback name are answered")
    port: int = key(8000, "port")
    api_key_env: Optional[str] = key(None, "name of an environment variable holding the key clients must send")
    served_model_name: Optional[str] = key(None, "the model id clients ask for (default: the adapter's or model's "
                                                 "name)")
    default_max_tokens: int = key(512, "completion tokens when a request does not say (less if the context is shorter)")
    max_request_bytes: int = key(1_000_000, "largest request body accepted (413 past it)")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, seed, ...) are accepted, see UNSUPPORTED

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[dict] = None


class CompletionRequest(Common):
    prompt: str
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[dict]]


class ChatRequest(Common):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


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


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where a string that cannot be UTF-8 (a lone UTF-16 surrogate from the JSON) is, if anywhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or None
    elif isinstance(value, dict):
        return next((p for k, v in value.items() if (p := _lone_surrogate(v, f"{path}.{k}" if path else k))), None)
    elif isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _lone_surrogate(v, f"{path}[{i}]"))), None)
    return None


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, kind, param, code), status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of everything: the Host header (DNS rebinding cannot reach a loopback
    server), the API key (compared in constant time; ``Bearer`` in any case) and the body size."""

    def __init__(self, app, api_key: str | None, loopback_only: bool, max_bytes: int):
        self.app, self.api_key, self.loopback_only, self.max_bytes = app, api_key, loopback_only, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        refusal = self._refusal(headers, scope["path"])
        if refusal is not None:
            return await refusal(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"the request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, counted_receive, send)

    def _refusal(self, headers: dict[str, str], path: str) -> Response | None:
        host = headers.get("host", "")
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if self.loopback_only and name.lower() not in LOOPBACK:
            return _error(403, f"Host '{host}' is not served: this server answers only on loopback (start it with "
                               "host=... to serve other names)", kind="permission_error")
        if self.api_key and path != "/health":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return _error(413, f"the request body is larger than {self.max_bytes} bytes")
        return None


async def _until_disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _choice_logprobs(tokenizer, entries, chat: bool) -> dict:
    """OpenAI's logprobs object for these tokens: chat's ``content`` list, or the completions' columns."""
    def token(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def entry(token_id: int, logprob: float) -> dict:
        return {"token": token(token_id), "logprob": logprob, "bytes": list(token(token_id).encode("utf-8"))}

    if chat:
        return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}
    strings = [token(e.token_id) for e in entries]
    offsets = [sum(len(s) for s in strings[:i]) for i in range(len(strings))]
    return {"tokens": strings, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**{token(t): lp for t, lp in e.top}, token(e.token_id): e.logprob} for e in entries],
            "text_offset": offsets}


def create_app(loaded: LoadedModel, cfg: ServeConfig) -> FastAPI:
    model_id = cfg.served_model_name or loaded.name
    engine: Engine = loaded.engine(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()  # the batching thread stops; requests still open end as cancelled

    app = FastAPI(title="alpaca-lora", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return _error(exc.status, exc.message, exc.param, exc.kind, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        return _error(400, f"{param}: {first['msg']}" if param else first["msg"], param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        return _error(exc.status_code, str(exc.detail), kind=kinds.get(exc.status_code, "invalid_request_error"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return _error(500, f"the server failed: {type(exc).__name__}: {exc}", kind="server_error")

    @app.get("/v1/models")
    async def models():
        model = {"id": model_id, "object": "model", "created": 0, "owned_by": "alpaca-lora"}
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health():
        status = engine.status()
        return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)

    def check(request: Common, prompt: str, chat: bool) -> tuple[list[int], Sampling]:
        """The prompt's tokens and the request's sampling, or an APIError naming the field at fault."""
        if request.model != model_id:
            raise APIError(404, f"model '{request.model}' is not served here; this server serves '{model_id}'",
                           "model", "not_found_error")
        for name, neutral in UNSUPPORTED.items():
            if name in (request.model_extra or {}) and not neutral(request.model_extra[name]):
                raise APIError(400, f"'{name}' is not supported by this server", name)
        if (where := _lone_surrogate(request.model_dump(exclude_none=True))) is not None:
            raise APIError(400, f"{where}: the text holds a lone surrogate (invalid UTF-16 in the JSON string)", where)
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences", "stop")
        prompt_ids = engine.prompt_ids(loaded.encode(prompt))
        context = engine.context_length
        asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
        max_tokens = asked or min(cfg.default_max_tokens, context - len(prompt_ids))
        if max_tokens < 1 or len(prompt_ids) + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{len(prompt_ids) + max(max_tokens, 0)} tokens ({len(prompt_ids)} in the "
                                f"{'messages' if chat else 'prompt'}, {max(max_tokens, 0)} in the completion). "
                                "Please reduce the length of the messages or completion.",
                           "messages" if chat else "prompt", code="context_length_exceeded")
        sampling = Sampling(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                            stop=tuple(s for s in stop if s), strip=chat)
        return prompt_ids, sampling

    async def run(http: Request, request: Common, prompt: str, chat: bool):
        prompt_ids, sampling = check(request, prompt, chat)
        if chat and request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        top = (request.top_logprobs or 0) if chat else request.logprobs
        wants_logprobs = request.logprobs if chat else request.logprobs is not None
        copies = request.n if sampling.greedy else 1  # greedy gives one answer: generate it once
        try:
            requests = engine.submit(prompt_ids, sampling, n=request.n // copies)
        except QueueFull as exc:
            raise APIError(429, str(exc), kind="rate_limit_error", code="rate_limit_exceeded") from None
        scorers = [engine.scorer(prompt_ids, top) for _ in requests] if wants_logprobs else None
        reply = Reply(loaded, model_id, chat, requests, copies, scorers, request.stream_options)
        if request.stream:  # (the background task ends the requests if the stream never even started)
            return StreamingResponse(reply.events(http.receive), media_type="text/event-stream",
                                     background=BackgroundTask(reply.cancel))
        work = asyncio.ensure_future(reply.whole())
        gone = asyncio.ensure_future(_until_disconnected(http.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client has gone: its requests end now, nobody reads the answer
                work.cancel()
        if work.cancelled():
            return Response(status_code=499)
        try:
            return work.result()
        except EngineError as exc:
            raise APIError(500, str(exc), kind="server_error") from None

    @app.post("/v1/completions")
    async def completions(http: Request, request: CompletionRequest):
        return await run(http, request, request.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request, request: ChatRequest):
        return await run(http, request, chat_prompt(loaded, request.messages), chat=True)

    return Guard(app, os.environ.get(cfg.api_key_env) if cfg.api_key_env else None,
                 loopback_only=cfg.host in LOOPBACK, max_bytes=cfg.max_request_bytes)


class Reply:
    """One API answer over the engine's requests: choice ``i`` is request ``i // copies``."""

    def __init__(self, loaded: LoadedModel, model_id: str, chat: bool, requests: list[EngineRequest], copies: int,
                 scorers, stream_options: dict | None):
        self.loaded, self.chat, self.requests, self.copies, self.scorers = loaded, chat, requests, copies, scorers
        self.include_usage = bool((stream_options or {}).get("include_usage"))
        self.ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.head = {"id": self.ident, "created": int(time.time()), "model": model_id}

    async def _logprobs(self, index: int, token_ids: list[int]) -> dict | None:
        if self.scorers is None:
            return None
        entries = await asyncio.to_thread(self.scorers[index].score, token_ids)
        return _choice_logprobs(self.loaded.tokenizer, entries, self.chat)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    def usage(self) -> dict:
        prompt = self.requests[0].prompt_tokens
        completion = sum(r.completion_tokens for r in self.requests) * self.copies
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self) -> dict:
        token_ids: list[list[int]] = [[] for _ in self.requests]
        async with aclosing(follow(self.requests)) as events:
            async for index, delta in events:
                if delta is not None:
                    token_ids[index] += delta.token_ids
        choices = []
        for index, request in enumerate(self.requests):
            logprobs = await self._logprobs(index, token_ids[index])
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

    async def events(self, receive):
        """Server-sent events in OpenAI's chunk format, then ``data: [DONE]``; a client that goes away
        (or stops reading) ends its requests at once."""
        gone = asyncio.ensure_future(_until_disconnected(receive))
        gone.add_done_callback(lambda _: self.cancel())
        try:
            if self.chat:
                for index in range(len(self.requests)):
                    yield self._chunk(index, None, first=True)
            async with aclosing(follow(self.requests)) as events:
                async for index, delta in events:
                    if delta is None:
                        yield self._chunk(index, None, self.requests[index].finish_reason)
                    elif delta.text or self.scorers:
                        yield self._chunk(index, delta.text, logprobs=await self._logprobs(index, delta.token_ids))
            if self.include_usage:
                body = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion",
                        "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(body)}\n\n"
        except EngineError as exc:
            yield f"data: {json.dumps(_error_body(str(exc), 'server_error'))}\n\n"
        finally:
            gone.cancel()
        yield "data: [DONE]\n\n"


def load_serve_config(argv: list[str]) -> ServeConfig:
    cfg = load_inference_settings(ServeConfig, argv, TOOL)
    check(cfg.engine_checks() + [(cfg.max_request_bytes >= 1024, "max_request_bytes", "must be at least 1024")])
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"key 'api_key_env': the environment variable {cfg.api_key_env} is not set")
    return cfg


def run(cfg: ServeConfig) -> int:
    import uvicorn

    loaded = load_for_inference(cfg)
    app = create_app(loaded, cfg)
    model_id = cfg.served_model_name or loaded.name
    print(f"serving {loaded.description} as '{model_id}' at http://{cfg.host}:{cfg.port}/v1"
          f"{' (API key required)' if cfg.api_key_env else ''}", flush=True)
    print(f"requests: {loaded.engine().description}", flush=True)
    # A stream still open at shutdown gets 5 s, then the engine stops and the process exits.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def main(argv: list[str] | None = None) -> int:
    usage = "[adapter=DIR] [model=DIR] [port=8000] [key=value ...]"
    return entry_point(argv, lambda: help_text(TOOL, usage, ServeConfig), load_serve_config, run) or 0


if __name__ == "__main__":
    sys.exit(main())
