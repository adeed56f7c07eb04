"""``answer``: one generator's answers on an evaluation set, from a local model or an endpoint.

Every finished answer (local) or request (endpoint) is journaled beside the answers, so a killed run
continues where it stopped and no item is answered twice; the answers file and its AlpacaEval form
are rewritten, in the set's order, at the end of every run. A multi-turn set's later turns are asked once
the turn before is answered, with the generator's own earlier answers in the conversation.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from alpaca_lora.common.errors import DataError
from alpaca_lora.common.journal import Journal
from alpaca_lora.common.logs import get_logger
from alpaca_lora.data.templates import conversation_prompt, get_template
from alpaca_lora.endpoint.client import Outcome
from alpaca_lora.endpoint.runner import MAX_CONSECUTIVE_FAILURES, Totals, run_requests, summary
from alpaca_lora.endpoint.stops import exit_code, stop_on_sigterm
from alpaca_lora.evaluate.answers import file_name, write_answers
from alpaca_lora.evaluate.sets import EvalSet, answered_in_turns, fold, load_eval_set
from alpaca_lora.evaluate.settings import AnswerConfig

log = get_logger(__name__).info


def decoding_settings(cfg: AnswerConfig) -> dict:
    """What the answers record about how they were made; a resume must use the same."""
    if cfg.uses_endpoint:
        return {"api": cfg.api, "system": cfg.system, **endpoint_sampling(cfg),
                **({"template": cfg.template} if cfg.api == "completions" else {})}
    settings = {"decoding": cfg.decoding, "max_new_tokens": cfg.max_new_tokens}
    for name in ("temperature", "top_p", "top_k", "num_beams", "repetition_penalty"):
        if getattr(cfg, name) is not None:
            settings[name] = getattr(cfg, name)
    return settings


def model_settings(cfg: AnswerConfig) -> dict:
    """Which model answered, as the command named it; a resume must name the same."""
    if cfg.uses_endpoint:
        return {"base_url": cfg.base_url, "model": cfg.model}
    return {"model": cfg.model, "adapter": cfg.adapter, "bits": cfg.quant.bits, "template": cfg.template}


def endpoint_sampling(cfg: AnswerConfig) -> dict:
    if cfg.decoding == "greedy":
        return {"temperature": 0.0, "max_tokens": cfg.max_new_tokens}
    return {"temperature": cfg.temperature or 1.0, "top_p": cfg.top_p, "max_tokens": cfg.max_new_tokens}


class Answering:
    """The items still to answer and the answers so far, restored from the journal."""

    def __init__(self, eval_set: EvalSet, generator: str, cfg: AnswerConfig, journal: Journal):
        self.items, self.source, self.generator, self.journal = eval_set.items, eval_set.source, generator, journal
        self.decoding, self.model = decoding_settings(cfg), model_settings(cfg)
        self.entries = journal.read()
        self.answered: dict[str, dict] = {}
        by_key = {item["key"]: item for item in self.items}
        for number, entry in enumerate(self.entries, start=1):
            for record in entry.get("records", []):
                made = {name: record.get(name) for name in ("generator", "model", "decoding")}
                wanted = {"generator": generator, "model": self.model, "decoding": self.decoding}
                if made != wanted:
                    differ = ", ".join(f"{name} {made[name]} (now {wanted[name]})" for name in made
                                       if made[name] != wanted[name])
                    raise DataError(f"{journal.path}: line {number}: answers made with {differ}; "
                                    "use another output=")
                if record.get("key") in by_key:  # a smaller limit= this time: keep the others for later
                    self.answered[record["key"]] = record
        self.todo = [item for item in self.items if item["key"] not in self.answered]

    def record(self, item: dict, output: str) -> dict:
        """The answer to ``item``; a multi-turn set's item keeps the answer itself (``answer``), and a later turn's
        output, what the judge sees, shows the generator's earlier answers first."""
        answer = {**item, "output": output.strip(), "generator": self.generator, "model": self.model,
                  "decoding": self.decoding}
        if "turns" in item:
            answer["answer"] = output.strip()
            answer["output"] = answered_in_turns(self.earlier_answers(item), output.strip()) if item["previous"] \
                else output.strip()
        self.answered[item["key"]] = answer
        return answer

    def ready(self, item: dict) -> bool:
        """An item can be asked: a single turn, or a later turn whose turn before is answered."""
        return not item.get("previous") or item["previous"] in self.answered

    def earlier_answers(self, item: dict) -> list[str]:
        answers, previous = [], item.get("previous")
        while previous:
            answers.insert(0, self.answered[previous]["answer"])
            previous = self.answered[previous].get("previous")
        return answers

    def messages(self, item: dict) -> list[dict]:
        """The conversation a multi-turn set's item is answered in: the user's turns, the generator's own answers."""
        messages = []
        for turn, answer in zip(item["turns"], self.earlier_answers(item)):
            messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
        return messages + [{"role": "user", "content": item["turns"][-1]}]

    def passes(self):
        """The items still to answer, in passes: each pass those whose turn before is answered (all of them at
        once for a single-turn set)."""
        asked: set[str] = set()
        while batch := [item for item in self.items
                        if item["key"] not in self.answered and item["key"] not in asked and self.ready(item)]:
            asked |= {item["key"] for item in batch}
            yield batch

    def in_order(self) -> list[dict]:
        return [self.answered[item["key"]] for item in self.items if item["key"] in self.answered]


def run_answer(cfg: AnswerConfig) -> int:
    eval_set = load_eval_set(cfg.set, cfg.held_out, cfg.limit)  # the set and the journal are checked first
    generator = cfg.generator or (cfg.model if cfg.uses_endpoint else Path(cfg.adapter or cfg.model).name)
    output = Path(cfg.output or f"outputs/evaluate/{file_name(generator)}.jsonl")
    answering = Answering(eval_set, generator, cfg, Journal(journal_path(output)))
    if not answering.todo:
        return _finish(answering, output, "finished")
    if cfg.uses_endpoint:
        return _answer_with_endpoint(cfg, answering, output)
    return _answer_with_local_model(cfg, answering, output)


def _answer_with_local_model(cfg: AnswerConfig, answering: Answering, output: Path) -> int:
    from alpaca_lora.evaluate.local import LocalModel

    model = LocalModel(cfg, cfg.batch_size)
    log(f"{len(answering.items)} items; {model.description}; {len(answering.answered)} answered before")
    stop, number, skipped = "finished", len(answering.entries), []
    stop_on_sigterm()  # a scheduler's preemption, `kill`: stop cleanly
    try:
        with tqdm(total=len(answering.items), initial=len(answering.answered), desc="answering", unit="item") as bar:
            for batch in answering.passes():
                asked = [{"messages": answering.messages(item)} if "turns" in item else item for item in batch]
                for position, text, error in model(asked, cfg):
                    bar.update(1)
                    if error:  # not journaled: a rerun tries it again
                        skipped.append((batch[position]["id"], error))
                        continue
                    answering.journal.append({"request": number, "mode": "answer", "prompt_tokens": 0,
                                              "completion_tokens": 0, "retries": 0, "problem": None, "error": None,
                                              "records": [answering.record(batch[position], text)], "discarded": {}})
                    number += 1
    except KeyboardInterrupt:
        stop = "interrupted"
    for item_id, error in skipped:
        log(f"error: item {item_id}: {error}; skipped (a rerun tries it again)")
    return _finish(answering, output, "items_failed" if skipped and stop == "finished" else stop)


def _answer_with_endpoint(cfg: AnswerConfig, answering: Answering, output: Path) -> int:
    endpoint = cfg.open_endpoint(cfg.model, cfg.api, endpoint_sampling(cfg))
    totals = Totals()
    for entry in answering.entries:
        totals.add(entry)
    job = AnswerJob(answering, cfg)
    log(f"{len(answering.items)} items; model {cfg.model} at {endpoint.client.base_url}, {cfg.api} API; "
        f"{len(answering.answered)} answered before")
    stop_on_sigterm()
    started = time.monotonic()
    stop = run_requests(job, endpoint, answering.journal, cfg.budget(), totals, "answer", desc="answering")
    usage = summary(job, totals, endpoint, stop, time.monotonic() - started, job.total)
    cost = "" if usage["cost_usd"] is None else f", ${usage['cost_usd']:,.4f}"
    log(f"{totals.requests} requests, {totals.prompt_tokens + totals.completion_tokens:,} tokens{cost}"
        + (f"; failed requests: {usage['failed_request'] + usage['rejected_request']}" if totals.problems else ""))
    if stop == "endpoint_failing":
        log(f"stopped after {MAX_CONSECUTIVE_FAILURES} failed requests in a row; the last error: {totals.last_error}")
    return _finish(answering, output, stop)


class AnswerJob:
    """The runner's job for ``answer`` through an endpoint: one request per item still to answer."""

    def __init__(self, answering: Answering, cfg: AnswerConfig):
        self.answering, self.cfg = answering, cfg
        self.total = len(answering.items)
        self.template = get_template(cfg.template) if cfg.api == "completions" else None
        self._pending = list(answering.todo)  # each asked once per run; a later turn once the turn before is answered

    def next_prompt(self, number: int):
        item = next((item for item in self._pending if self.answering.ready(item)), None)
        if item is None:
            return None
        self._pending.remove(item)
        return item, self.prompt(item)

    def pending_prompts(self) -> list:
        """For the estimate before the first request: a later turn's prompt, whose earlier answers are not known
        yet, counted as its own turn alone."""
        return [self.prompt(item) if self.answering.ready(item) else item["turns"][-1] for item in self._pending]

    def prompt(self, item: dict) -> str | list[dict]:
        """The chat messages, or with api=completions the training template's prompt (a conversation folded)."""
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        messages = self.answering.messages(item) if "turns" in item else \
            [{"role": "user", "content": fold(item["instruction"], item["input"])}]
        if not self.template:
            return system + messages
        if "turns" not in item:
            return self.template.format(item["instruction"], item["input"])
        return conversation_prompt(self.template, system + messages, "", multi_turn=False)  # folded

    def accept(self, item: dict, reply: Outcome) -> dict:
        if reply.problem and reply.problem != "empty_reply":  # an empty answer is an answer, and loses
            return {"id": item["id"], "records": [], "discarded": {}}
        return {"id": item["id"], "records": [self.answering.record(item, reply.text or "")], "discarded": {}}

    def done(self) -> int:
        return len(self.answering.answered)

    def finished(self) -> bool:
        return self.done() == self.total


def journal_path(output: Path) -> Path:
    return output.with_name(output.stem + ".journal.jsonl")


def _finish(answering: Answering, output: Path, stop: str) -> int:
    records = answering.in_order()
    alpaca_eval = write_answers(output, records)
    log(f"{len(records)} of {len(answering.items)} answers to {answering.source} by {answering.generator} in {output} "
        f"(AlpacaEval form: {alpaca_eval}); stopped: {stop}")
    if len(records) < len(answering.items):
        log("run the same command again to continue")
    return exit_code(stop)
