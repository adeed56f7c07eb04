"""What goes over the wire: OpenAI's request and response shapes for the two endpoints, the parameters this
server refuses rather than ignores, and the API error in OpenAI's ``{"error": {...}}`` shape (as vLLM's
``entrypoints/openai/protocol.py``). No logic beyond validating the fields."""

from __future__ import annotations

from typing import Any, List, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOP_LOGPROBS = 5

# OpenAI parameters this server does not implement: sent with an effect, they are refused, not ignored.
UNSUPPORTED = {
    "tools": lambda v: not v, "functions": lambda v: not v, "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"), "response_format": lambda v: v in (None, {"type": "text"}),
    "logit_bias": lambda v: not v, "presence_penalty": lambda v: not v, "frequency_penalty": lambda v: not v,
    "echo": lambda v: not v, "best_of": lambda v: v in (None, 1), "suffix": lambda v: not v,
}


class APIError(Exception):
    """A request refused or failed, answered in OpenAI's error shape with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class SamplingRequest(BaseModel):
    """What both endpoints share: the model asked for and how to sample."""

    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, ...) are accepted, see UNSUPPORTED

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    seed: Optional[int] = None  # sampled with a generator of its own: same seed, prompt and settings, same text


class CompletionRequest(SamplingRequest):
    prompt: str
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _a_count(cls, value):
        if isinstance(value, bool):  # JSON true/false would pass as 1/0
            raise ValueError(f"for completions an integer 0..{MAX_TOP_LOGPROBS} (alternatives listed per token) or "
                             "null; true/false is the chat API's form")
        return value


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[dict]]


class ChatRequest(SamplingRequest):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where a string that cannot be UTF-8 (a lone UTF-16 surrogate from the JSON) is, if anywhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or None
    elif isinstance(value, dict):
        return next((p for k, v in value.items() if (p := lone_surrogate(v, f"{path}.{k}" if path else k))), None)
    elif isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := lone_surrogate(v, f"{path}[{i}]"))), None)
    return None
