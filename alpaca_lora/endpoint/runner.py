"""Runs a job's requests against the endpoint: many in flight, at a steady rate if asked, within a
request and cost budget, journaling each finished request so that the same command resumes."""

from __future__ import annotations

import math
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tqdm.auto import tqdm

from alpaca_lora.common.journal import Journal
from alpaca_lora.common.logs import get_logger
from alpaca_lora.endpoint.client import Endpoint, Outcome

# This many failed or rejected requests in a row (each after all its retries) means the endpoint is
# down or refuses our requests (a parameter it does not take): stop and show the last error.
MAX_CONSECUTIVE_FAILURES = 10
# A reply that is not an OpenAI response (a proxy's error page with status 200) is the endpoint failing too.
FAILURES = ("failed_request", "rejected_request", "malformed_reply")
# Before any reply has measured a prompt: a rough rule for English text and GPT-style tokenizers.
CHARS_PER_TOKEN = 4
log = get_logger(__name__)


class Job(Protocol):
    """What a mode asks of the engine; ``accept`` runs in the main thread, one reply at a time."""

    total: int

    def restore(self, entries: list[dict], journal: Journal) -> None: ...
    def next_prompt(self, number: int) -> tuple[Any, str | list[dict]] | None: ...  # (key, prompt or messages)
    def accept(self, key: Any, reply: Outcome) -> dict: ...
    def done(self) -> int: ...
    def finished(self) -> bool: ...
    # Optional: ``pending_prompts() -> list`` (the prompts still to send), for the estimate before the first request.


@dataclass
class Totals:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    problems: Counter = field(default_factory=Counter)  # see Outcome.problem
    last_error: str | None = None
    discarded: Counter = field(default_factory=Counter)
    succeeded: int = 0
    records: int = 0

    def add(self, entry: dict) -> None:
        self.requests += 1
        self.retries += entry["retries"]
        self.prompt_tokens += entry["prompt_tokens"]
        self.completion_tokens += entry["completion_tokens"]
        if entry["problem"]:
            self.problems[entry["problem"]] += 1
            self.last_error = entry.get("error") or self.last_error
        else:
            self.succeeded += 1
        self.discarded.update(entry["discarded"])
        self.records += len(entry["records"])


class Pacer:
    """Spaces request starts at most ``per_minute`` a minute (None: no limit). The clock and the sleep are
    injectable, so a test checks the schedule itself rather than how busy the machine was."""

    def __init__(self, per_minute: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.clock, self.sleep = clock, sleep
        self.next_start = -math.inf

    def ready(self) -> bool:
        return self.clock() >= self.next_start

    def started(self) -> None:
        self.next_start = self.clock() + self.interval

    def delay(self) -> float:
        """Seconds until the next request may start (0 if it may start now)."""
        return max(0.0, self.next_start - self.clock())


@dataclass
class Budget:
    concurrency: int
    requests_per_minute: float | None
    max_requests: int | None
    max_cost: float | None


@dataclass
class Flight:
    """A request on its way: its number, the job's key, its prompt, the prompt's size and its estimated cost."""

    number: int
    key: Any
    prompt: str | list[dict]
    chars: int
    cost: float | None


def prompt_chars(prompt: str | list[dict]) -> int:
    """The characters a prompt (or a chat's messages) sends."""
    return len(prompt) if isinstance(prompt, str) else sum(len(str(m.get("content") or "")) for m in prompt)


class CostEstimate:
    """What a request will cost before it is sent, so that none is sent past ``max_cost``, the first included:
    its prompt's characters at the tokens per character this run's replies measured (``CHARS_PER_TOKEN`` until one
    comes back), plus the average reply so far."""

    def __init__(self, endpoint: Endpoint, totals: Totals):
        self.endpoint, self.totals = endpoint, totals
        self.chars = self.tokens = 0

    def prompt_tokens(self, chars: int) -> float:
        return chars * (self.tokens / self.chars if self.tokens else 1 / CHARS_PER_TOKEN)

    def cost(self, chars: int) -> float | None:
        replies = self.totals.succeeded
        completion = self.totals.completion_tokens / replies if replies else 0.0
        return self.endpoint.cost(self.prompt_tokens(chars), completion)

    def measured(self, chars: int, prompt_tokens: int) -> None:
        if prompt_tokens:
            self.chars, self.tokens = self.chars + chars, self.tokens + prompt_tokens


def announce(job: Job, endpoint: Endpoint, budget: Budget) -> None:
    """Before the first request: how many requests, about how many prompt tokens and, with a price, what the prompts
    cost; a warning when that is past ``max_cost`` (a huge answers file must not reach a paid judge unnoticed)."""
    pending = getattr(job, "pending_prompts", None)
    sizes = [prompt_chars(prompt) for prompt in pending()] if pending else []
    if not sizes:
        return
    tokens = sum(sizes) / CHARS_PER_TOKEN
    cost = endpoint.cost(tokens, 0)
    line = (f"{len(sizes)} requests to send, about {tokens:,.0f} prompt tokens ({CHARS_PER_TOKEN} characters a "
            f"token; the longest prompt about {max(sizes) / CHARS_PER_TOKEN:,.0f})")
    if cost is None:
        log.info(line + "; no price known for a cost estimate (price_input=, price_output=)")
    elif budget.max_cost is not None and cost > budget.max_cost:
        log.warning(f"warning: {line}, estimated {_dollars(cost)} for the prompts alone: over max_cost="
                    f"{_dollars(budget.max_cost)}, so the run stops (resumably) before its spend would pass it")
    else:
        log.info(f"{line}, estimated {_dollars(cost)} for the prompts alone")


def run_requests(job: Job, endpoint: Endpoint, journal: Journal, budget: Budget, totals: Totals,
                 mode: str, desc: str, pacer: Pacer | None = None) -> str:
    """Runs until the job is finished or a limit is reached; returns why it stopped."""
    pacer = pacer or Pacer(budget.requests_per_minute)
    estimate = CostEstimate(endpoint, totals)
    announce(job, endpoint, budget)
    number = totals.requests
    in_flight: dict = {}  # future -> Flight
    failures_in_a_row = 0
    stop = None
    bar = tqdm(total=job.total, initial=job.done(), desc=desc, unit="rec", dynamic_ncols=True)
    pool = ThreadPoolExecutor(budget.concurrency)
    try:
        while True:
            if stop is None and job.finished():
                stop = "finished"
            if stop is None and failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                stop = "endpoint_failing"
            while stop is None and len(in_flight) < budget.concurrency and pacer.ready():
                flight, stop = _launch(job, endpoint, budget, totals, estimate, in_flight, number)
                if flight is None:
                    break
                in_flight[pool.submit(endpoint.complete, flight.prompt)] = flight
                number += 1
                pacer.started()
            if not in_flight:
                if stop is not None:
                    break
                if not pacer.ready():
                    pacer.sleep(pacer.delay())
                    continue
                stop = "nothing_left"  # every remaining item was tried in this run
                break
            finished, _ = wait(in_flight, timeout=pacer.delay() or None, return_when=FIRST_COMPLETED)
            for future in finished:
                flight = in_flight.pop(future)
                reply = future.result()  # raises EndpointError: stop the run
                estimate.measured(flight.chars, reply.prompt_tokens)
                entry = {"request": flight.number, "mode": mode, "prompt_tokens": reply.prompt_tokens,
                         "completion_tokens": reply.completion_tokens, "retries": reply.retries,
                         "problem": reply.problem, "error": reply.error, **job.accept(flight.key, reply)}
                journal.append(entry)
                totals.add(entry)
                failures_in_a_row = failures_in_a_row + 1 if reply.problem in FAILURES else 0
                bar.n = job.done()
                bar.set_postfix_str(_postfix(totals, endpoint), refresh=True)
    except KeyboardInterrupt:
        stop = "interrupted"
    finally:
        bar.close()
        if in_flight:  # interrupted or failed: abandon them, their replies would not be journaled
            endpoint.close()
        pool.shutdown(wait=not in_flight, cancel_futures=True)
    return stop


def _launch(job: Job, endpoint: Endpoint, budget: Budget, totals: Totals, estimate: CostEstimate, in_flight: dict,
            number: int) -> tuple[Flight | None, str | None]:
    """The next request to send, or None and, when a limit is reached with
    nothing in flight to wait for, the reason to stop. A request past ``max_cost`` is never sent: the run
    stops there, and the next run asks it first."""
    if budget.max_requests is not None and totals.requests + len(in_flight) >= budget.max_requests:
        return None, None if in_flight else "max_requests"
    if budget.max_cost is not None and in_flight and not totals.succeeded:
        return None, None  # no reply measured yet: one request at a time
    if _in_flight_should_suffice(job, totals, len(in_flight)):
        return None, None
    request = job.next_prompt(number)
    if request is None:
        return None, None
    key, prompt = request
    chars = prompt_chars(prompt)
    flight = Flight(number, key, prompt, chars, estimate.cost(chars))
    if budget.max_cost is not None and flight.cost is not None:
        spent = endpoint.cost(totals.prompt_tokens, totals.completion_tokens)
        coming = sum(f.cost or 0.0 for f in in_flight.values())
        if spent + coming + flight.cost > budget.max_cost:
            log.info(f"max_cost={_dollars(budget.max_cost)}: the next request (about "
                     f"{estimate.prompt_tokens(flight.chars):,.0f} prompt tokens, {_dollars(flight.cost)}) would take "
                     f"the spend ({_dollars(spent)}{f' + {_dollars(coming)} in flight' if coming else ''}) past it; "
                     "not sent")
            return None, "max_cost"
    return flight, None


def _in_flight_should_suffice(job: Job, totals: Totals, in_flight: int) -> bool:
    """Near the end, do not pay for requests whose records would only be discarded as over target."""
    replied = totals.requests - totals.problems["failed_request"] - totals.problems["rejected_request"]
    if not in_flight or not totals.records or not replied:
        return False
    return in_flight * totals.records / replied >= job.total - job.done()


def _postfix(totals: Totals, endpoint: Endpoint) -> str:
    cost = endpoint.cost(totals.prompt_tokens, totals.completion_tokens)
    dropped = ", ".join(f"{reason} {count}" for reason, count in totals.discarded.most_common())
    problems = ", ".join(f"{reason} {count}" for reason, count in totals.problems.most_common())
    return " | ".join(filter(None, [
        f"requests {totals.requests}", f"tokens {totals.prompt_tokens + totals.completion_tokens:,}",
        _dollars(cost) if cost is not None else "", f"dropped: {dropped}" if dropped else "", problems]))


def _dollars(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 10 else f"${amount:.4f}" if amount >= 0.01 or not amount else f"${amount:.6f}"


def summary(job: Job, totals: Totals, endpoint: Endpoint, stop: str, elapsed: float, target: int) -> dict:
    cost = endpoint.cost(totals.prompt_tokens, totals.completion_tokens)
    done = job.done()
    per_record = {"prompt_tokens": round(totals.prompt_tokens / done, 1) if done else None,
                  "completion_tokens": round(totals.completion_tokens / done, 1) if done else None}
    return {
        "stop_reason": stop, "complete": job.finished(), "records": done, "target": target,
        "requests": totals.requests, "retries": totals.retries,
        **{problem: totals.problems[problem]
           for problem in ("failed_request", "rejected_request", "malformed_reply", "empty_reply")},
        "last_error": totals.last_error,
        "prompt_tokens": totals.prompt_tokens, "completion_tokens": totals.completion_tokens,
        "cost_usd": None if cost is None else round(cost, 4),
        "price_usd_per_million_tokens": None if endpoint.price is None else
        {"input": endpoint.price[0], "output": endpoint.price[1]},
        "tokens_per_record": per_record,
        "projected_cost_usd_for_target": round(cost / done * target, 4) if cost is not None and done else None,
        "discarded": dict(totals.discarded.most_common()),
        "seconds_this_run": round(elapsed, 1),
    }
