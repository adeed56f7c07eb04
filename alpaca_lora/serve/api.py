"""The HTTP side (as vLLM's ``api_server.py``): the routes, a few lines each over ``OpenAIServing``; errors in OpenAI's
shape; a client that disconnects ends its requests; and ``Guard``, the middleware in front of everything."""

from __future__ import annotations

import asyncio
import hmac
import os
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from alpaca_lora.inference.engine import EngineError
from alpaca_lora.inference.loading import LoadedModel
from alpaca_lora.serve.config import LOOPBACK, ServeConfig
from alpaca_lora.serve.protocol import APIError, ChatRequest, CompletionRequest, error_body
from alpaca_lora.serve.serving import OpenAIServing, PreparedRequest, ResponseBuilder, engine_failure


def create_app(loaded: LoadedModel, cfg: ServeConfig):
    """The ASGI app serving ``loaded`` as ``cfg`` says: its generation engine starts here, stops with the app."""
    engine = loaded.start_engine(cfg)
    serving = OpenAIServing(loaded, engine, cfg.served_model_name or loaded.name, cfg.default_max_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()  # the batching thread stops; requests still open end as cancelled

    app = FastAPI(title="alpaca-lora", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    add_error_handlers(app)
    app.include_router(routes(serving))
    return Guard(app, os.environ.get(cfg.api_key_env) if cfg.api_key_env else None,
                 loopback_only=cfg.host in LOOPBACK, max_bytes=cfg.max_request_bytes)


def routes(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": serving.model_id, "object": "model", "created": 0,
                                            "owned_by": "alpaca-lora"}]}

    @router.get("/health")
    async def health():
        status = serving.engine.status()
        return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)

    @router.post("/v1/completions")
    async def completions(http: Request, request: CompletionRequest):
        return await answer(http, serving, serving.prepare(request))

    @router.post("/v1/chat/completions")
    async def chat_completions(http: Request, request: ChatRequest):
        return await answer(http, serving, serving.prepare(request))

    return router


async def answer(http: Request, serving: OpenAIServing, prepared: PreparedRequest) -> Response | dict:
    """The answer streamed or whole; a client that disconnects first ends its requests (499, nobody reads it)."""
    builder = serving.respond(prepared)
    if prepared.request.stream:  # (the background task ends the requests if the stream never even started)
        return StreamingResponse(_watched(builder, http.receive), media_type="text/event-stream",
                                 background=BackgroundTask(builder.cancel))
    work = asyncio.ensure_future(builder.whole())
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
        raise engine_failure(exc) from None


async def _watched(builder: ResponseBuilder, receive):
    """The builder's events; a client that goes away (or stops reading) ends its requests at once."""
    gone = asyncio.ensure_future(_until_disconnected(receive))
    gone.add_done_callback(lambda _: builder.cancel())
    try:
        async for event in builder.events():
            yield event
    finally:
        gone.cancel()


async def _until_disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, kind, param), status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    """Every error, a validation error and an internal failure included, in OpenAI's shape."""
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

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
