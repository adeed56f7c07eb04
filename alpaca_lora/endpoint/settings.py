"""The keys every command that calls an endpoint takes (where, how fast, how much), checked once, and
the :class:`Endpoint` and :class:`Budget` they make."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from alpaca_lora.common.errors import UserError
from alpaca_lora.common.settings import key
from alpaca_lora.endpoint.client import Endpoint, price_per_million
from alpaca_lora.endpoint.runner import Budget


@dataclass
class EndpointSettings:
    base_url: Optional[str] = key(None, "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: "
                                        "OPENAI_BASE_URL or OpenAI); the key is read from OPENAI_API_KEY only")
    concurrency: int = key(8, "requests in flight at once")
    requests_per_minute: Optional[float] = key(None, "start requests at this steady rate at most")
    max_requests: Optional[int] = key(None, "stop (resumably) after this many requests in all, across resumes")
    max_cost: Optional[float] = key(None, "stop (resumably) before the spend in USD would pass this, across resumes")
    prices: Optional[str] = key(None, "YAML/JSON file {model: {input: USD, output: USD}} per million tokens, "
                                      "over the built-in table")
    price_input: Optional[float] = key(None, "USD per million prompt tokens for this model (overrides the table)")
    price_output: Optional[float] = key(None, "USD per million completion tokens for this model")
    timeout: float = key(120.0, "seconds before a request is abandoned and retried")
    max_retries: int = key(5, "retries per request for 429, 5xx, timeouts and dropped connections (backoff, "
                                  "jitter)")

    def endpoint_checks(self) -> list[tuple]:
        """The ``(ok, key, message)`` checks of these keys, for :func:`alpaca_lora.common.settings.check`."""
        return [
            (self.concurrency >= 1, "concurrency", "must be at least 1"),
            (self.requests_per_minute is None or self.requests_per_minute > 0, "requests_per_minute",
             "must be positive"),
            (self.max_requests is None or self.max_requests >= 1, "max_requests", "must be at least 1"),
            (self.max_cost is None or self.max_cost > 0, "max_cost", "must be positive"),
            (self.timeout > 0, "timeout", "must be positive"),
            (self.max_retries >= 0, "max_retries", "must be 0 or more"),
        ]

    def open_endpoint(self, model: str, api: str, sampling: dict) -> Endpoint:
        """The priced endpoint for ``model``; ``max_cost`` without a known price is an error, before any request."""
        price = price_per_million(model, self.prices, self.price_input, self.price_output)
        if self.max_cost is not None and price is None:
            raise UserError(f"max_cost needs a price for model '{model}': set price_input and price_output "
                            "(USD per million tokens) or prices=FILE")
        sampling = {name: value for name, value in sampling.items() if value is not None}
        return Endpoint(model, self.base_url, api, sampling, self.timeout, self.max_retries, price)

    def budget(self) -> Budget:
        return Budget(self.concurrency, self.requests_per_minute, self.max_requests, self.max_cost)
