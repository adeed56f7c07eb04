"""``feedback export``: the app's votes and the arena's as TRL's preference data.

- ``dpo.jsonl``: paired preferences, ``prompt``, ``chosen``, ``rejected`` (DPOTrainer's format);
- ``kto.jsonl``: unpaired, ``prompt``, ``completion``, ``label`` (KTOTrainer's format: true is desirable);
- ``summary.json``: what was read, what was written, and what was left out and why (also printed).

Each row also carries its ``instruction`` and ``input`` (training checks that the prompt renders from them
in the adapter's template), ``votes`` (the counts behind it) and ``source`` (app, arena, ratings).

The prompt is the instruction and input rendered in the template the model to tune was trained with
(``adapter=``'s training_config.yaml, or ``template=``), exactly as training and generation prompt it. An app
vote is on an answer to the prompt the app sent; where that prompt is not this rendering (the app served a
model with another template), the vote is left out and counted. An answer is its text with surrounding
whitespace removed (as training data and the arena keep answers); an empty answer is left out.

The rules (docs/feedback.md shows examples):

- **Pairs (DPO).** Every comparison of the same two answers to the same prompt is counted together, from the
  app ("A is better", "B is better", "Tie", "Both are bad") and from the arena ("Response 1/2 is better" is
  mapped back to its answer through the position the arena showed it in; its "Tie" and "Both are bad"). The
  pair is exported when one outcome has a strict majority of those votes (more than half): a side (chosen over
  the other), or else it is left out as a tie, as both bad, or as split (voters disagree, no majority).
  Two identical answers make no pair. With ``pair_ratings`` (default), an answer a majority rated up and
  another answer to the same prompt a majority rated down also make a pair, unless a comparison covers them.
- **Unpaired (KTO).** Each answer's votes: a rating up, or winning a comparison, counts as desirable; a rating
  down, losing a comparison, or "both are bad" counts as undesirable; a tie counts neither way (this is how TRL
  unpairs preference data). The answer is exported with the label of the strict majority; an even split, or
  ties alone, leave it out.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.paths import atomic_write_text
from alpaca_lora.data.templates import PromptTemplate, get_template
from alpaca_lora.feedback.settings import ExportConfig

log = get_logger(__name__).info


@dataclass(frozen=True)
class Asked:
    """A prompt, as the model to tune is prompted, and what it was rendered from."""

    prompt: str
    instruction: str
    input: str


@dataclass
class Votes:
    """Everything the votes say, by prompt and answer text, and what was read and left out."""

    template: PromptTemplate
    asked: dict[str, Asked] = field(default_factory=dict)
    ratings: dict[tuple[str, str], Counter] = field(default_factory=lambda: defaultdict(Counter))
    comparisons: dict[tuple[str, frozenset], Counter] = field(default_factory=lambda: defaultdict(Counter))
    sources: dict[tuple, set] = field(default_factory=lambda: defaultdict(set))
    read: dict[str, dict] = field(default_factory=dict)
    votes_left_out: Counter = field(default_factory=Counter)

    def ask(self, instruction: str, input_text: str) -> str:
        prompt = self.template.format(instruction, input_text)
        self.asked[prompt] = Asked(prompt, instruction, input_text)
        return prompt

    def rate(self, prompt: str, answer: str, good: bool, source: str) -> None:
        self.ratings[(prompt, answer)]["up" if good else "down"] += 1
        self.sources[(prompt, answer)].add(source)

    def compare(self, prompt: str, first: str, second: str, outcome: str, source: str) -> None:
        """``outcome``: 'a' (``first`` is better), 'b', 'tie' or 'bad'."""
        key = (prompt, frozenset((first, second)))
        self.comparisons[key][{"a": first, "b": second}.get(outcome, outcome)] += 1
        self.sources[key].add(source)


def read_app_votes(votes: Votes, db: str) -> None:
    """The app's ratings and comparisons; a vote on a prompt sent in another template is left out."""
    from alpaca_lora.feedback.store import FeedbackStore

    rows = FeedbackStore(db).votes()
    for row in rows:
        prompt = votes.ask(row["a_instruction"], row["a_input"])
        answer, other = row["a_output"].strip(), (row["b_output"] or "").strip()
        if row["a_prompt"] != prompt:
            votes.votes_left_out[f"app: prompt sent in another template than {votes.template.name}"] += 1
        elif not answer or (row["other"] and not other):
            votes.votes_left_out["app: an empty answer"] += 1
        elif row["other"]:
            votes.compare(prompt, answer, other, row["choice"], "app")
        else:
            votes.rate(prompt, answer, row["choice"] == "up", "app")
    votes.read["app"] = {"db": db, **_vote_counts(rows, lambda row: "comparison" if row["other"] else "rating")}


def read_arena_votes(votes: Votes, db: str) -> None:
    """The arena's votes: a button ("Response 1/2 is better") is mapped back to its answer through the position
    the arena showed it in (``winner_of``)."""
    from alpaca_lora.arena.page import ArenaStore, winner_of

    rows = ArenaStore(db).votes()
    for row in rows:
        prompt = votes.ask(row["instruction"], row["input"])
        a, b = row["output_a"].strip(), row["output_b"].strip()
        if not a or not b:
            votes.votes_left_out["arena: an empty answer"] += 1
            continue
        votes.compare(prompt, a, b, winner_of(row["choice"], row["first"]), "arena")
    votes.read["arena"] = {"db": db, **_vote_counts(rows, lambda row: "comparison")}


def _vote_counts(rows: list[dict], kind) -> dict:
    named = {row["voter"] for row in rows if row["voter"]}
    return {"votes": len(rows), **Counter(f"{kind(row)}s" for row in rows),
            "named_voters": len(named), "anonymous_votes": sum(not row["voter"] for row in rows)}


def majority(counts: Counter) -> str | None:
    """The outcome with more than half of the votes, or None."""
    outcome, top = counts.most_common(1)[0] if counts else (None, 0)
    return outcome if top * 2 > sum(counts.values()) else None


def dpo_rows(votes: Votes, pair_ratings: bool) -> tuple[list[dict], Counter]:
    """The pairs the votes imply, and how many pairs were left out for each reason."""
    rows, left_out = [], Counter()
    for (prompt, answers), counts in votes.comparisons.items():
        if len(answers) == 1:
            left_out["identical answers"] += 1
            continue
        winner = majority(counts)
        if winner in answers:
            (loser,) = answers - {winner}
            rows.append(_pair(votes, prompt, winner, loser, counts, votes.sources[(prompt, answers)]))
        else:
            left_out[{"tie": "tie", "bad": "both bad"}.get(winner, "split: no majority")] += 1
    if pair_ratings:
        rows += _pairs_from_ratings(votes)
    return sorted(rows, key=lambda r: (r["prompt"], r["chosen"], r["rejected"])), left_out


def _pair(votes: Votes, prompt: str, chosen: str, rejected: str, counts: Counter, sources) -> dict:
    asked = votes.asked[prompt]
    tally = {"chosen": counts[chosen], "rejected": counts[rejected], "tie": counts["tie"], "bad": counts["bad"]}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "instruction": asked.instruction,
            "input": asked.input, "votes": tally, "source": "+".join(sorted(sources))}


def _pairs_from_ratings(votes: Votes) -> list[dict]:
    """For one prompt, each answer rated up (by majority) with each rated down, where no comparison covers them."""
    labels = defaultdict(lambda: {"up": [], "down": []})
    for (prompt, answer), counts in votes.ratings.items():
        label = majority(counts)
        if label:
            labels[prompt][label].append((answer, counts))
    rows = []
    for prompt, rated in labels.items():
        for good, good_counts in rated["up"]:
            for bad, bad_counts in rated["down"]:
                if (prompt, frozenset((good, bad))) not in votes.comparisons:
                    counts = Counter({good: good_counts["up"], bad: bad_counts["down"]})
                    rows.append(_pair(votes, prompt, good, bad, counts, {"ratings"}))
    return rows


def kto_rows(votes: Votes) -> tuple[list[dict], Counter]:
    """One row per answer with a majority label, and how many answers were left out for each reason."""
    evidence: dict[tuple[str, str], Counter] = defaultdict(Counter)
    sources: dict[tuple[str, str], set] = defaultdict(set)
    for (prompt, answer), counts in votes.ratings.items():
        evidence[(prompt, answer)].update({"desirable": counts["up"], "undesirable": counts["down"]})
        sources[(prompt, answer)] |= votes.sources[(prompt, answer)]
    for (prompt, answers), counts in votes.comparisons.items():
        for answer in answers:
            won = counts[answer] if len(answers) == 2 else 0  # "A is better" of two identical answers says nothing
            lost = sum(counts[other] for other in answers - {answer})
            evidence[(prompt, answer)].update({"desirable": won, "undesirable": lost + counts["bad"]})
            sources[(prompt, answer)] |= votes.sources[(prompt, answers)]
    rows, left_out = [], Counter()
    for (prompt, answer), counts in evidence.items():
        good, bad = counts["desirable"], counts["undesirable"]
        if good == bad:
            left_out["ties only" if good == 0 else "split: no majority"] += 1
            continue
        asked = votes.asked[prompt]
        rows.append({"prompt": prompt, "completion": answer, "label": good > bad, "instruction": asked.instruction,
                     "input": asked.input, "votes": {"desirable": good, "undesirable": bad},
                     "source": "+".join(sorted(sources[(prompt, answer)]))})
    return sorted(rows, key=lambda r: (r["prompt"], r["completion"])), left_out


def kto_weights(rows: list[dict]) -> dict:
    """The desirable_weight range the KTO paper recommends for this balance (undesirable_weight 1): the ratio
    desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3] (arXiv:2402.01306, Eq. 8,
    as TRL's KTOTrainer checks it)."""
    good = sum(row["label"] for row in rows)
    bad = len(rows) - good
    if not good or not bad:
        return {"desirable": good, "undesirable": bad, "desirable_weight": None}
    return {"desirable": good, "undesirable": bad,
            "desirable_weight": [round(bad / good, 2), round(bad / good * 4 / 3, 2)]}


def summarize(cfg: ExportConfig, votes: Votes, dpo: list[dict], dpo_left: Counter, kto: list[dict],
              kto_left: Counter) -> dict:
    sources = Counter(row["source"] for row in dpo)
    return {"template": votes.template.name, "read": votes.read, "votes_left_out": dict(votes.votes_left_out),
            "dpo": {"file": str(Path(cfg.output_dir) / "dpo.jsonl"), "pairs": len(dpo), "by_source": dict(sources),
                    "pairs_left_out": dict(dpo_left)},
            "kto": {"file": str(Path(cfg.output_dir) / "kto.jsonl"), "rows": len(kto), **kto_weights(kto),
                    "answers_left_out": dict(kto_left)}}


def summary_lines(summary: dict) -> list[str]:
    lines = [f"{name} votes: {read['votes']} from {read['db']} ({read['named_voters']} named voters, "
             f"{read['anonymous_votes']} anonymous votes)" for name, read in summary["read"].items()]
    lines += [f"left out: {n} votes ({why})" for why, n in summary["votes_left_out"].items()]
    dpo, kto = summary["dpo"], summary["kto"]
    lines.append(f"dpo: {dpo['pairs']} pairs in {dpo['file']}"
                 + "".join(f"; {n} from {source}" for source, n in dpo["by_source"].items()))
    lines += [f"  left out: {n} pairs ({why})" for why, n in dpo["pairs_left_out"].items()]
    weight = kto["desirable_weight"]
    lines.append(f"kto: {kto['rows']} rows in {kto['file']} ({kto['desirable']} desirable, {kto['undesirable']} "
                 "undesirable" + (f"; desirable_weight {weight[0]} to {weight[1]} balances them" if weight else "")
                 + ")")
    lines += [f"  left out: {n} answers ({why})" for why, n in kto["answers_left_out"].items()]
    return lines


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def run_export(cfg: ExportConfig) -> int:
    votes = Votes(get_template(cfg.template))
    if cfg.feedback_db:
        read_app_votes(votes, cfg.feedback_db)
    if cfg.arena_db:
        read_arena_votes(votes, cfg.arena_db)
    dpo, dpo_left = dpo_rows(votes, cfg.pair_ratings)
    kto, kto_left = kto_rows(votes)
    summary = summarize(cfg, votes, dpo, dpo_left, kto, kto_left)
    output = Path(cfg.output_dir)
    atomic_write_text(output / "dpo.jsonl", jsonl(dpo))
    atomic_write_text(output / "kto.jsonl", jsonl(kto))
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    for line in summary_lines(summary):
        log(line)
    return 0
