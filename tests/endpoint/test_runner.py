"""The request runner shared by the data builder, the answerer and the judge: pacing, on an injected clock."""

import pytest

from alpaca_lora.common.journal import Journal
from alpaca_lora.endpoint.client import Endpoint
from alpaca_lora.endpoint.runner import Budget, Pacer, Totals, run_requests
from alpaca_lora.endpoint.scripted import Canned, Fault, ScriptedOpenAI


class FakeClock:
    """Time that passes only when the runner sleeps: the pacing schedule is checked exactly, whatever the
    load on the machine (a wall-clock gap between requests measures the machine, not the pacer)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


class Asking:
    """A job of ``total`` one-line requests that records the (fake) time at which each one starts."""

    def __init__(self, total: int, clock: FakeClock):
        self.total, self.clock, self.schedule, self.replies = total, clock, [], 0

    def restore(self, entries, journal):
        pass

    def next_prompt(self, number):
        if len(self.schedule) == self.total:
            return None
        self.schedule.append(self.clock())
        return number, "Say ok."

    def accept(self, key, reply):
        self.replies += 1
        return {"records": [], "discarded": {}}

    def done(self):
        return self.replies

    def finished(self):
        return self.replies >= self.total


@pytest.mark.parametrize("per_minute, gap", [(300, 0.2), (None, 0.0)])
def test_requests_per_minute_spaces_request_starts(tmp_path, per_minute, gap):
    clock = FakeClock()
    job = Asking(4, clock)
    with ScriptedOpenAI() as server:
        endpoint = Endpoint("gpt-4o-mini", server.base_url, "chat", {}, timeout=60.0, max_retries=0, price=None)
        budget = Budget(concurrency=4, requests_per_minute=per_minute, max_requests=None, max_cost=None)
        pacer = Pacer(per_minute, clock=clock, sleep=clock.sleep)
        stop = run_requests(job, endpoint, Journal(tmp_path / "j.jsonl"), budget, Totals(), "t", "t", pacer=pacer)
    assert stop == "finished" and job.replies == 4
    # 60 s / 300 = 0.2 s between starts, by the pacer's own clock; without a rate, all four start at once
    assert [round(b - a, 9) for a, b in zip(job.schedule, job.schedule[1:])] == [gap] * 3


class Keeping:
    """A job that keeps whatever comes back, an empty or malformed reply included (as ``answer`` keeps an empty
    answer and the judge once scored a reply without a verdict as a tie), one record per reply."""

    def __init__(self, total: int, done: int = 0):
        self.total, self.kept, self.asked = total, done, done

    def next_prompt(self, number):
        if self.asked >= self.total:
            return None
        self.asked += 1
        return number, "Say ok."

    def accept(self, key, reply):
        self.kept += 1
        return {"records": [key], "discarded": {}}

    def done(self):
        return self.kept

    def finished(self):
        return self.kept >= self.total


@pytest.mark.parametrize("bad", [Canned(""), Fault(body="<html>oops</html>")])
def test_records_kept_from_bad_replies_alone_neither_crash_the_run_nor_its_resume(tmp_path, bad):
    """Records so far, yet no reply that succeeded: the estimate of what the requests in flight will bring must not
    divide by the zero successes (a ZeroDivisionError, then the same on every rerun)."""
    journal = Journal(tmp_path / "j.jsonl")
    budget = Budget(concurrency=3, requests_per_minute=None, max_requests=None, max_cost=None)
    with ScriptedOpenAI(default=lambda body: bad) as server:
        endpoint = Endpoint("gpt-4o-mini", server.base_url, "chat", {}, timeout=60.0, max_retries=0, price=None)
        first = Keeping(4)
        assert run_requests(first, endpoint, journal, budget, Totals(), "t", "t") == "finished"
        totals = Totals()
        for entry in journal.read():
            totals.add(entry)
        resumed = Keeping(8, done=first.kept)
        assert run_requests(resumed, endpoint, journal, budget, totals, "t", "t") == "finished"
    assert (first.kept, resumed.kept, len(server.received)) == (4, 8, 8)
