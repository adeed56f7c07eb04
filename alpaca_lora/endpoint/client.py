"""A model behind any OpenAI-compatible endpoint (a teacher, a judge), through the official ``openai`` client.

The client retries 429 (honouring ``Retry-After``), 5xx, timeouts and dropped connections with
exponential backoff and jitter; we count its retries, sum token usage and price it, and turn every
failure into a counted, skippable :class:`Outcome` (a request rejected for its content, such as one
record over the context length, included) -- except a bad key, a missing permission or an unknown
model, which no request can get past and which stop the run at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import openai
import yaml

from alpaca_lora.common.errors import UserError

# USD per million tokens (input, output), from the providers' published price lists (2025);
# prices change: override them with prices=FILE or price_input= / price_output=.
PRICES = {
    "gpt-5-nano": (0.05, 0.40), "gpt-5-mini": (0.25, 2.00), "gpt-5": (1.25, 10.00),
    "gpt-4.1-nano": (0.10, 0.40), "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1": (2.00, 8.00),
    "gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00), "gpt-3.5-turbo": (0.50, 1.50),
}


class EndpointError(UserError):
    """The endpoint refuses every request: authentication, permission or the model's name."""


@dataclass
class Outcome:
    """What one request came to: the text and its usage, or the problem that made it count as failed."""

    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    problem: str | None = None  # failed_request, rejected_request, malformed_reply or empty_reply
    error: str | None = None


def price_per_million(model: str, prices_file: str | None, price_input: float | None,
                      price_output: float | None) -> tuple[float, float] | None:
    """(input, output) USD per million tokens for ``model``, or None when unknown.

    A dated snapshot such as ``gpt-4o-mini-2024-07-18`` takes its family's price.
    """
    table = dict(PRICES)
    if prices_file:
        try:
            loaded = yaml.safe_load(Path(prices_file).read_text(encoding="utf-8"))
            table.update({name: (float(p["input"]), float(p["output"])) for name, p in loaded.items()})
        except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{prices_file}: expected {{model: {{input: USD, output: USD}}}} per million tokens "
                            f"({type(exc).__name__}: {exc})") from None
    family = max((name for name in table if model == name or model.startswith(name + "-")), key=len, default=None)
    known = table.get(family)
    if price_input is None and price_output is None:
        return known
    if known is None and (price_input is None or price_output is None):
        raise UserError(f"no price for model '{model}': set both price_input and price_output")
    return (price_input if price_input is not None else known[0],
            price_output if price_output is not None else known[1])


class Endpoint:
    """One OpenAI-compatible model: requests with retries, counted and priced."""

    def __init__(self, model: str, base_url: str | None, api: str, sampling: dict, timeout: float,
                 max_retries: int, price: tuple[float, float] | None):
        api_key = os.environ.get("OPENAI_API_KEY")
        if not api_key:
            if not (base_url or os.environ.get("OPENAI_BASE_URL")):
                raise UserError("OPENAI_API_KEY is not set (the key is read from the environment only)")
            api_key = "unused"  # local servers (vLLM, Ollama, llama.cpp) usually need none
        self.model, self.api, self.sampling, self.price = model, api, sampling, price
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if self.price is None:
            return None
        return (prompt_tokens * self.price[0] + completion_tokens * self.price[1]) / 1e6

    def complete(self, prompt: str | list[dict]) -> Outcome:
        """One request, with the client's retries; never raises except :class:`EndpointError`.

        ``prompt`` is the user's message, or (chat API) the whole list of messages, a system prompt among them.
        """
        try:
            if self.api == "chat":
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                raw = self.client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, **self.sampling)
            else:
                raw = self.client.completions.with_raw_response.create(
                    model=self.model, prompt=prompt, **self.sampling)
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
            return Outcome(retries=self.client.max_retries, problem="failed_request", error=_message(exc))
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403, 404):  # the key, the permission or the model: no request can succeed
                raise EndpointError(f"{self.client.base_url}: {_message(exc)}") from None
            retried = exc.status_code in (408, 409) or exc.status_code >= 500
            return Outcome(retries=self.client.max_retries if retried else 0,
                         problem="failed_request" if retried else "rejected_request",
                         error=_message(exc))
        try:
            completion = raw.parse()
            choice = completion.choices[0]
            text = choice.message.content if self.api == "chat" else choice.text
            usage = completion.usage
            prompt_tokens = int(usage.prompt_tokens) if usage else 0
            completion_tokens = int(usage.completion_tokens) if usage else 0
        except (openai.APIResponseValidationError, AttributeError, IndexError, TypeError, ValueError):
            return Outcome(retries=raw.retries_taken, problem="malformed_reply", error=_not_a_reply(raw))
        return Outcome(text=text, finish_reason=choice.finish_reason, prompt_tokens=prompt_tokens,
                     completion_tokens=completion_tokens, retries=raw.retries_taken,
                     problem=None if text and text.strip() else "empty_reply")

    def close(self) -> None:
        self.client.close()


def _not_a_reply(raw) -> str:
    """What came back instead of an OpenAI response (a proxy's HTML page, a truncated body), shortened."""
    try:
        body = " ".join(raw.http_response.text.split())
    except Exception:  # noqa: BLE001 - an unreadable body is described as such
        body = "(unreadable)"
    return f"{raw.http_response.status_code} reply is not an OpenAI response: {body[:80] or '(empty body)'}"


def _message(exc: openai.APIError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    message = error.get("message") if isinstance(error, dict) else None
    message = (message or exc.message or type(exc).__name__).splitlines()[0]
    return f"{exc.status_code} {message}" if isinstance(exc, openai.APIStatusError) else message
