"""An OpenAI-compatible HTTP API for a fine-tuned model:
``alpaca-lora serve [adapter=DIR] [model=DIR] [port=8000] [api_key_env=NAME]``

``/v1/chat/completions`` wraps the conversation in the training template: the last message (from
the user) is the instruction; system messages and earlier turns become the template's input, as a
transcript (``User: ...``, ``Assistant: ...``). ``/v1/completions`` continues a raw prompt as is.
One model generates one request at a time; concurrent requests wait their turn.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from alpaca_lora.errors import ConfigError
from alpaca_lora.inference import (
    Decoding,
    Generation,
    InferenceModel,
    LoadedModel,
    load_for_inference,
    load_inference_settings,
)
from alpaca_lora.settings import entry_point, help_text, key

TOOL = "serve"


@dataclass
class ServeConfig(InferenceModel):
    host: str = key("127.0.0.1", "interface to bind (0.0.0.0 exposes the server to the network)")
    port: int = key(8000, "port")
    api_key_env: Optional[str] = key(None, "name of an environment variable holding the key clients must send")
    served_model_name: Optional[str] = key(None, "the model id clients ask for "
                                                 "(default: the adapter's or model's name)")
    default_max_tokens: int = key(512, "completion tokens when a request does not say")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (user, seed, ...) are accepted

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[dict] = None


class CompletionRequest(Sampling):
    prompt: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[dict]]


class ChatRequest(Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


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


def create_app(loaded: LoadedModel, cfg: ServeConfig) -> FastAPI:
    model_id = cfg.served_model_name or loaded.name
    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    app = FastAPI(title="alpaca-lora", docs_url=None, redoc_url=None)

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        return error(400, f"{param}: {first['msg']}" if param else first["msg"], param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), kind=kind)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return error(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")
        return await call_next(request)

    @app.get("/v1/models")
    def models():
        model = {"id": model_id, "object": "model", "created": 0, "owned_by": "alpaca-lora"}
        return {"object": "list", "data": [model]}

    def check(request: Sampling) -> tuple[Decoding, list[str]]:
        if request.model != model_id:
            raise APIError(404, f"model '{request.model}' is not served here; this server serves '{model_id}'",
                           "model", "not_found_error")
        if request.stream and request.n > 1:
            raise APIError(400, "stream=true supports n=1 only", "n")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences", "stop")
        max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens or cfg.default_max_tokens
        if request.temperature == 0:
            return Decoding(decoding="greedy", max_new_tokens=max_tokens), stop
        return Decoding(decoding="sample", max_new_tokens=max_tokens, temperature=request.temperature,
                        top_p=request.top_p if request.top_p < 1 else None), stop

    def run(prompt: str, request: Sampling, chat: bool):
        decoding, stop = check(request)
        created, ident = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        if request.stream:
            return StreamingResponse(_stream(Generation(loaded, prompt, decoding, stop, strip=chat), request, chat,
                                             ident, created, model_id), media_type="text/event-stream")
        generations = []
        for _ in range(request.n):
            generation = Generation(loaded, prompt, decoding, stop, strip=chat)
            for _piece in generation:
                pass
            generations.append(generation)
            if decoding.decoding == "greedy":  # the same answer every time: generate it once
                generations += [generation] * (request.n - 1)
                break
        choices = [{"index": i, "finish_reason": g.finish_reason,
                    **({"message": {"role": "assistant", "content": g.text}} if chat
                       else {"text": g.text, "logprobs": None})}
                   for i, g in enumerate(generations)]
        completion_tokens = sum(g.completion_tokens for g in generations)
        usage = {"prompt_tokens": generations[0].prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": generations[0].prompt_tokens + completion_tokens}
        return {"id": ident, "object": kind, "created": created, "model": model_id, "choices": choices, "usage": usage}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        return run(request.prompt, request, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        return run(chat_prompt(loaded, request.messages), request, chat=True)

    return app


def _stream(generation: Generation, request: Sampling, chat: bool, ident: str, created: int, model_id: str):
    """Server-sent events in OpenAI's chunk format, then ``data: [DONE]``."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish_reason: str | None = None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish_reason, "logprobs": None}
        body = {"id": ident, "object": kind, "created": created, "model": model_id, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    if chat:
        yield chunk(None, first=True)
    for piece in generation:
        yield chunk(piece)
    yield chunk(None, generation.finish_reason)
    if (request.stream_options or {}).get("include_usage"):
        usage = {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                 "total_tokens": generation.prompt_tokens + generation.completion_tokens}
        body = {"id": ident, "object": kind, "created": created, "model": model_id, "choices": [], "usage": usage}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def load_serve_config(argv: list[str]) -> ServeConfig:
    cfg = load_inference_settings(ServeConfig, argv, TOOL)
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
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    usage = "[adapter=DIR] [model=DIR] [port=8000] [key=value ...]"
    return entry_point(argv, lambda: help_text(TOOL, usage, ServeConfig), load_serve_config, run) or 0


if __name__ == "__main__":
    sys.exit(main())
