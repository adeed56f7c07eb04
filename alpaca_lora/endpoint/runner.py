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
from alpaca_lora.endpoint.client import Endpoint, Reply

# This many failed or rejected requests in a row (each after all its retries) means the endpoint is
# down or refuses our requests (a parameter it does not take): stop and show the last error.
MAX_CONSECUTIVE_FAILURES = 10
# A reply that is not an OpenAI response (a proxy's error page with status 200) is the endpoint failing too.
FAILURES = ("failed_request", "rejected_request", "malformed_reply")


class Job(Protocol):
    """What a mode asks of the engine; ``accept`` runs in the main thread, one reply at a time."""

    total: int

    def restore(self, entries: list[dict], journal: Journal) -> None: ...
    def next_prompt(self, number: int) -> tuple[Any, str | list[dict]] | None: ...  # (key, prompt or messages)
    def accept(self, key: Any, reply: Reply) -> dict: ...
    def done(self) -> int: ...
    def finished(self) -> bool: ...


@dataclass
class Totals:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    problems: Counter = field(default_factory=Counter)  # see Reply.problem
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


def run_requests(job: Job, endpoint: Endpoint, journal: Journal, budget: Budget, totals: Totals,
                 mode: str, desc: str, pacer: Pacer | None = None) -> str:
    """Runs until the job is finished or a limit is reached; returns why it stopped."""
    pacer = pacer or Pacer(budget.requests_per_minute)
    number = totals.requests
    in_flight: dict = {}
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
                limit = _budget_limit(budget, totals, endpoint, len(in_flight))
                if limit and not in_flight:
                    stop = limit
                if limit or _in_flight_should_suffice(job, totals, len(in_flight)):
                    break
                request = job.next_prompt(number)
                if request is None:
                    break
                key, prompt = request
                in_flight[pool.submit(endpoint.complete, prompt)] = (number, key)
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
                request_number, key = in_flight.pop(future)
                reply = future.result()  # raises EndpointError: stop the run
                entry = {"request": request_number, "mode": mode, "prompt_tokens": reply.prompt_tokens,
                         "completion_tokens": reply.completion_tokens, "retries": reply.retries,
                         "problem": reply.problem, "error": reply.error, **job.accept(key, reply)}
                journal.append(entry)
                totals.add(entry)
                failed = reply.problem in FAILURES
                failures_in_a_row = failures_in_a_row + 1 if failed else 0
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


def _budget_limit(budget: Budget, totals: Totals, endpoint: Endpoint, in_flight: int) -> str | None:
    """The limit one more request would pass, counting those in flight at the average cost so far."""
    if budget.max_requests is not None and totals.requests + in_flight >= budget.max_requests:
        return "max_requests"
    if budget.max_cost is None:
        return None
    if not totals.succeeded:
        return "max_cost" if in_flight else None  # no cost measured yet: one request at a time
    spent = endpoint.cost(totals.prompt_tokens, totals.completion_tokens)
    return "max_cost" if spent + (in_flight + 1) * spent / totals.succeeded > budget.max_cost else None


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
    return f"${amount:,.2f}" if amount >= 10 else f"${amount:.4f}"


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
