"""What goes over the wire: OpenAI's request and response shapes for the two endpoints, the parameters this
server refuses rather than ignores, and the API error in OpenAI's ``{"error": {...}}`` shape (as vLLM's
``entrypoints/openai/protocol.py``). No logic beyond validating the fields."""

from __future__ import annotations

from typing import Any, List, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOP_LOGPROBS = 5

# Parameters of OpenAI's and vLLM's APIs this server does not implement: sent with an effect (anything but the
# neutral value shown), they are refused with a 400 naming them, never ignored.
UNSUPPORTED = {
    "tools": lambda v: not v, "functions": lambda v: not v, "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"), "response_format": lambda v: v in (None, {"type": "text"}),
    "logit_bias": lambda v: not v, "presence_penalty": lambda v: not v, "frequency_penalty": lambda v: not v,
    "echo": lambda v: not v, "best_of": lambda v: v in (None, 1), "suffix": lambda v: not v,
    # vLLM's extra sampling parameters
    "top_k": lambda v: v in (None, 0, -1), "min_p": lambda v: not v, "repetition_penalty": lambda v: v in (None, 1),
    "length_penalty": lambda v: v in (None, 1), "use_beam_search": lambda v: not v, "stop_token_ids": lambda v: not v,
    "include_stop_str_in_output": lambda v: not v, "skip_special_tokens": lambda v: v in (None, True),
    "spaces_between_special_tokens": lambda v: v in (None, True), "truncate_prompt_tokens": lambda v: v is None,
    "allowed_token_ids": lambda v: v is None, "bad_words": lambda v: not v, "prompt_logprobs": lambda v: v is None,
    "guided_json": lambda v: v is None, "guided_regex": lambda v: v is None, "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None, "structured_outputs": lambda v: v is None,
    "logits_processors": lambda v: not v, "return_tokens_as_token_ids": lambda v: not v,
    "add_special_tokens": lambda v: v in (None, True),
}
STREAM_OPTIONS = {"include_usage": bool, "continuous_usage_stats": lambda v: not v}  # what stream_options may say


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
    ignore_eos: bool = False  # (vLLM's) go on past the end-of-sequence token, to max_tokens
    min_tokens: int = Field(0, ge=0)  # (vLLM's) no end-of-sequence token, nor stop string, before this many tokens


class CompletionRequest(SamplingRequest):
    prompt: Union[str, List[str], List[int], List[List[int]]]  # a prompt, or several: one choice (n) for each
    max_tokens: Optional[int] = Field(None, ge=0)  # 0 only with echo: the prompt's log probabilities alone
    echo: bool = False  # the prompt before the completion, with its tokens' logprobs
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _a_prompt_form(cls, value):
        """OpenAI's four forms, said plainly when it is none of them (pydantic would list every union member)."""
        if isinstance(value, str):
            return value
        forms = "a string, a list of strings, a list of token ids or a list of lists of token ids"
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {forms} (not empty)")
        if all(isinstance(v, str) for v in value):
            return value
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        for i, ids in enumerate(value):
            if not isinstance(ids, list) or not ids or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise ValueError(f"must be {forms}; item [{i}] is not a (non-empty) list of token ids")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

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
