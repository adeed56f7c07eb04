"""``judge``: which of two answers follows the instruction better, for every item both files answered.

The LLM judge (``judge=llm``) sees the instruction and both responses, labelled A (shown first) and B,
and ends its reply with MT-Bench's verdict: ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie). A reply without a
verdict is asked again once, then scored as a tie. Every pair is judged in both orders; the pair goes
to a side only when both orders name that same response, anything else (the orders disagree, or
either says tie) is a tie. The position-bias rate is the share of pairs where both orders named the
same position (A twice, or B twice): the verdict followed the position, not the response.

Each request is journaled under a hash of (judge model, prompts, both responses), so a rerun in the
same ``output_dir`` costs nothing, a stopped run resumes, and a changed answer is judged again alone;
the verdicts are also kept in the user's judgment cache (``judgment_cache``), so a run in another
output directory, or of the swapped pair, pays only for what was never judged. Two identical
responses are a tie without asking.

The reference judge (``judge=reference``) needs no endpoint: a response that equals the reference
answer beats one that does not; both right or both wrong is a tie.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from alpaca_lora.common.errors import DataError
from alpaca_lora.common.journal import Journal
from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.paths import atomic_write_text
from alpaca_lora.endpoint.client import Endpoint, Outcome
from alpaca_lora.endpoint.runner import FAILURES, MAX_CONSECUTIVE_FAILURES, Totals, run_requests, summary
from alpaca_lora.endpoint.stops import exit_code, stop_on_sigterm
from alpaca_lora.evaluate.answers import Pair, file_name, load_answers, pair_answers
from alpaca_lora.evaluate.exact_match import is_exact_match
from alpaca_lora.evaluate.judgment_cache import JudgmentCache, cache_key
from alpaca_lora.evaluate.report import build_report, print_report, write_report
from alpaca_lora.evaluate.settings import JudgeConfig

ATTEMPTS = 2  # a reply without a verdict is asked again once, then scored as a tie

SYSTEM_PROMPT = """\
You are an impartial judge of AI assistants. You are shown an instruction (with its input, if it has \
one) and the responses of two assistants, A and B. Decide which response follows the instruction \
better: does it do what was asked, and is it correct, helpful, relevant, complete and clear? Judge the \
content only: the order in which the responses are shown, their length and the assistants' names must \
not sway you. Explain your comparison in a few sentences, then end your reply with your verdict in \
exactly one of these forms: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, \
"[[C]]" for a tie."""

USER_PROMPT = """\
[Instruction]
{instruction}

[Input]
{input}

[The Start of Assistant A's Response]
{first}
[The End of Assistant A's Response]

[The Start of Assistant B's Response]
{second}
[The End of Assistant B's Response]"""

_VERDICT = re.compile(r"\[\[([ABC])\]\]")
log = get_logger(__name__).info


def parse_verdict(reply: str | None) -> str | None:
    """The last ``[[A]]``, ``[[B]]`` or ``[[C]]`` in the reply, or None."""
    found = _VERDICT.findall(reply or "")
    return found[-1] if found else None


def judge_messages(pair: Pair, order: int) -> list[dict]:
    """Order 0 shows answer a first (as A), order 1 shows answer b first."""
    first, second = (pair.output_a, pair.output_b) if order == 0 else (pair.output_b, pair.output_a)
    user = USER_PROMPT.format(instruction=pair.instruction, input=pair.input or "(none)", first=first, second=second)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def request_hash(judge_model: str, messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps([judge_model, messages], ensure_ascii=False).encode()).hexdigest()


def side_of(verdict: str, order: int) -> str:
    """The answer ('a', 'b') a verdict names, or 'tie'."""
    if verdict == "C":
        return "tie"
    return "a" if (verdict == "A") == (order == 0) else "b"


def combine(first: str, second: str) -> str:
    """The pair's winner from the verdicts of order 0 and order 1: a side only when both orders name it."""
    sides = {side_of(first, 0), side_of(second, 1)}
    return sides.pop() if len(sides) == 1 else "tie"


class JudgeJob:
    """The runner's job: two requests per pair (one per order), each cached by its hash."""

    def __init__(self, pairs: list[Pair], judge_model: str, entries: list[dict]):
        self.pairs, self.judge_model = pairs, judge_model
        self.units = {}  # hash -> (pair index, order, messages)
        for index, pair in enumerate(pairs):
            if pair.output_a == pair.output_b:  # nothing to tell apart: a tie, not worth a request
                continue
            for order in (0, 1):
                messages = judge_messages(pair, order)
                self.units[request_hash(judge_model, messages)] = (index, order, messages)
        self.total = len(self.units)
        self.final: dict[str, dict] = {}  # hash -> {"verdict", "reply", "unparseable"}
        self.unparseable: dict[str, list[str]] = {}
        self.from_cache: set[str] = set()  # hashes taken from the user's judgment cache (this run or before)
        for entry in entries:
            self._note(entry)
        self._pending = [key for key in self.units if key not in self.final]
        self._retry: list[str] = []

    def take_cached(self, found: dict[str, dict]) -> list[dict]:
        """Judgments found in the user's cache, ``{hash: {"verdict", "reply"}}``, as final; their journal entries."""
        entries = [{"request": None, "mode": "judge", "cached": True, "hash": key, "verdict": judgment["verdict"],
                    "reply": judgment["reply"], "records": [key], "discarded": {}}
                   for key, judgment in found.items() if key in self.units and key not in self.final]
        for entry in entries:
            self._note(entry)
        self._pending = [key for key in self._pending if key not in self.final]
        return entries

    def new_verdicts(self) -> dict[str, dict]:
        """The real verdicts (not ties for want of one) that did not come from the cache: for the cache."""
        return {key: {"verdict": final["verdict"], "reply": final["reply"]} for key, final in self.final.items()
                if not final.get("no_verdict") and key not in self.from_cache}

    def _note(self, entry: dict) -> None:
        key = entry.get("hash")
        if key not in self.units or key in self.final or entry.get("problem") in FAILURES:
            return
        if entry.get("verdict"):
            self.final[key] = {"verdict": entry["verdict"], "reply": entry["reply"],
                               "unparseable": len(self.unparseable.get(key, []))}
            if entry.get("cached"):
                self.from_cache.add(key)
            return
        replies = self.unparseable.setdefault(key, [])
        replies.append(entry.get("reply"))
        if len(replies) >= ATTEMPTS:
            self.final[key] = {"verdict": "C", "reply": entry.get("reply"), "unparseable": len(replies),
                               "no_verdict": True}

    def next_prompt(self, number: int):
        queue = self._retry if self._retry else self._pending
        while queue:
            key = queue.pop(0)
            if key not in self.final:
                return key, self.units[key][2]
        return None

    def pending_keys(self) -> list[str]:
        return [key for key in self._retry + self._pending if key not in self.final]

    def pending_prompts(self) -> list[list[dict]]:
        return [self.units[key][2] for key in self.pending_keys()]

    def accept(self, key: str, reply: Outcome) -> dict:
        entry = {"hash": key, "verdict": None, "reply": reply.text}
        if reply.problem in FAILURES:  # no reply from the judge (an error page is none): asked again next run
            return {**entry, "records": [], "discarded": {}}
        entry["verdict"] = parse_verdict(reply.text)
        self._note({**entry, "problem": None})
        if entry["verdict"] is None and key not in self.final:
            self._retry.append(key)
        final = key in self.final
        return {**entry, "records": [key] if final else [],
                "discarded": {} if entry["verdict"] else {"unparseable": 1}}

    def done(self) -> int:
        return len(self.final)

    def finished(self) -> bool:
        return len(self.final) == self.total

    def judgments(self, generator_a: str, generator_b: str) -> list[dict]:
        """Per pair with both orders judged: the verdicts as given, both raw replies and the winner."""
        by_pair: dict[int, dict] = {}
        for key, (index, order, _messages) in self.units.items():
            if key in self.final:
                by_pair.setdefault(index, {})[order] = self.final[key]
        judged = []
        for index, pair in enumerate(self.pairs):
            if pair.output_a == pair.output_b:
                judged.append({**pair_fields(pair, generator_a, generator_b), "verdicts": ["C", "C"], "winner": "tie",
                               "replies": [None, None], "unparseable": 0, "identical": True})
                continue
            orders = by_pair.get(index, {})
            if len(orders) < 2:
                continue
            verdicts = [orders[0]["verdict"], orders[1]["verdict"]]
            judged.append({**pair_fields(pair, generator_a, generator_b), "verdicts": verdicts,
                           "winner": combine(*verdicts), "replies": [orders[0]["reply"], orders[1]["reply"]],
                           "unparseable": orders[0]["unparseable"] + orders[1]["unparseable"],
                           "no_verdict": sum(bool(orders[o].get("no_verdict")) for o in (0, 1))})
        return judged


def pair_fields(pair: Pair, generator_a: str, generator_b: str) -> dict:
    return {"id": pair.id, "key": pair.key, "category": pair.category, "instruction": pair.instruction,
            "input": pair.input, "a": generator_a, "b": generator_b, "output_a": pair.output_a,
            "output_b": pair.output_b}


def reference_judgments(pairs: list[Pair], generator_a: str, generator_b: str, source: str) -> list[dict]:
    judged = []
    for pair in pairs:
        if pair.reference is None:
            raise DataError(f"{source}: item '{pair.id}' has no reference answer; judge=reference needs a set with "
                            "checkable answers")
        right_a, right_b = is_exact_match(pair.output_a, pair.reference), is_exact_match(pair.output_b, pair.reference)
        winner = "tie" if right_a == right_b else ("a" if right_a else "b")
        judged.append({**pair_fields(pair, generator_a, generator_b), "reference": pair.reference,
                       "correct": [right_a, right_b], "winner": winner})
    return judged


def run_judge(cfg: JudgeConfig) -> int:
    a, b = load_answers(cfg.a), load_answers(cfg.b)
    pairs, unmatched = pair_answers(a, b)
    output_dir = Path(cfg.output_dir or f"outputs/evaluate/{file_name(a.generator)}_vs_{file_name(b.generator)}")
    log(f"{len(pairs)} items answered by both {a.generator} ({a.source}) and {b.generator} ({b.source})"
        + (f"; {unmatched} answered by one side only, left out" if unmatched else ""))
    if cfg.judge == "reference":
        judged = reference_judgments(pairs, a.generator, b.generator, f"{a.source} / {b.source}")
        return _finish(cfg, a, b, pairs, judged, output_dir, "reference (exact match)", None, "finished")

    journal = Journal(output_dir / "judge.journal.jsonl")
    entries = journal.read()
    job = JudgeJob(pairs, cfg.judge_model, entries)
    totals = Totals()
    for entry in entries:
        if not entry.get("cached"):
            totals.add(entry)
    requests_before = totals.requests
    judge = cfg.open_endpoint(cfg.judge_model, "chat", {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens})
    in_journal = job.done()
    cache = JudgmentCache(parse_verdict) if cfg.shared_cache else None
    from_cache = _take_from_cache(job, cache, judge, journal) if cache else 0
    log(f"judge {cfg.judge_model} at {judge.client.base_url}: {job.total} judgments (both orders), {in_journal} in "
        f"{journal.path}" + (f", {from_cache} from the judgment cache {cache.path}" if cache else ""))
    stop_on_sigterm()
    started = time.monotonic()
    stop = run_requests(job, judge, journal, cfg.budget(), totals, "judge", desc="judging")
    if cache:
        cache.put_many(cfg.judge_model, {_cache_key(key, judge): j for key, j in job.new_verdicts().items()})
    usage = summary(job, totals, judge, stop, time.monotonic() - started, job.total)
    usage = {name: usage[name] for name in ("requests", "retries", "failed_request", "rejected_request",
                                            "malformed_reply", "empty_reply", "prompt_tokens", "completion_tokens",
                                            "cost_usd", "price_usd_per_million_tokens", "last_error")}
    usage.update(requests_this_run=totals.requests - requests_before, from_cache=from_cache)
    if stop == "endpoint_failing":
        log(f"stopped after {MAX_CONSECUTIVE_FAILURES} failed requests in a row; the last error: {totals.last_error}")
    return _finish(cfg, a, b, pairs, job.judgments(a.generator, b.generator), output_dir, cfg.judge_model, usage, stop)


def _cache_key(key: str, judge: Endpoint) -> str:
    return cache_key(key, str(judge.client.base_url), judge.sampling)


def _take_from_cache(job: JudgeJob, cache: JudgmentCache, judge: Endpoint, journal: Journal) -> int:
    """The judgments still to make that the user's cache holds, journaled as this run's; how many."""
    keys = {_cache_key(key, judge): key for key in job.pending_keys()}
    found = cache.get_many(list(keys))
    entries = job.take_cached({keys[key]: judgment for key, judgment in found.items()})
    for entry in entries:
        journal.append(entry)
    return len(entries)


def _finish(cfg: JudgeConfig, a, b, pairs: list[Pair], judged: list[dict], output_dir: Path, judge: str,
            usage: dict | None, stop: str) -> int:
    judged = [{**j, "judge": judge} for j in judged]
    atomic_write_text(output_dir / "judgments.jsonl",
                      "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judged))
    if not judged:
        log(f"no pair was judged in both orders yet (stopped: {stop}); run the same command again to continue")
        return exit_code(stop, default=1)
    report = build_report(a.generator, b.generator, judged, judge=judge, pairs_total=len(pairs), usage=usage,
                          with_position=cfg.judge == "llm")
    report.update(a_file=a.source, b_file=b.source, stop_reason=stop)
    if cfg.judge == "llm":
        report["no_verdict"] = no_verdict(judged, cfg.max_unparseable)
    write_report(report, output_dir)
    print_report(report)
    log(f"report: {output_dir / 'report.json'}, chart: {output_dir / 'report.png'}, "
        f"judgments: {output_dir / 'judgments.jsonl'}")
    if not report["complete"]:
        if stop in ("max_requests", "max_cost"):
            log(f"stopped at {stop}: raise it and run the same command to judge the rest")
        else:
            log("run the same command again to judge the rest")
    code = exit_code(stop)
    missing = report.get("no_verdict")
    if missing and missing["share"] > cfg.max_unparseable:
        get_logger(__name__).warning(
            f"warning: {missing['judgments']} of {missing['of']} judgments ({missing['share']:.1%}) got no verdict "
            f"([[A]], [[B]] or [[C]]) though asked twice, and count as ties: past max_unparseable="
            f"{cfg.max_unparseable}, so these results say little (read the judge's replies in judgments.jsonl)")
        code = code or exit_code("no_verdict")
    return code


def no_verdict(judged: list[dict], threshold: float) -> dict:
    """How many judgments (one per order of a pair sent to the judge) ended without a verdict, as ties."""
    asked = [j for j in judged if not j.get("identical")]
    missing = sum(j.get("no_verdict", 0) for j in asked)
    return {"judgments": missing, "of": 2 * len(asked),
            "share": round(missing / (2 * len(asked)), 4) if asked else 0.0, "max_unparseable": threshold}
