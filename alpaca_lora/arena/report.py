"""``arena report [db=FILE] [judgments=FILE]``: the arena's votes in the judge's form, and how far people agree.

Per arena in the database: wins, losses and ties ("Both are bad" counts as a tie, and is counted apart),
the win rate of A with a bootstrap 95% interval, per category, the position bias (the share of
decisive votes that went to Response 1: 50% is none), agreement between voters on the items several
voted on (percent and Cohen's kappa per pair of voters, and overall weighted by shared items), and
with ``judgments=`` the agreement between the voters and a judge. Every vote also goes to a CSV file.
An arena is its two generators with their very answers: the same names with answers edited in place are
another arena, reported apart and said to be so.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from alpaca_lora.arena.page import ArenaStore, item_id
from alpaca_lora.common.errors import DataError
from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.paths import atomic_write_text
from alpaca_lora.evaluate.report import build_report, format_report, write_report
from alpaca_lora.evaluate.sets import read_json_records

CSV_FIELDS = ("arena", "a", "b", "answers_a", "answers_b", "voter", "item_id", "key", "category", "instruction",
              "input", "first", "choice", "winner", "time")


def outcome(vote: dict) -> str:
    return "tie" if vote["winner"] == "bad" else vote["winner"]


def cohen_kappa(ratings: list[tuple[str, str]]) -> float | None:
    """Agreement of two raters beyond chance; None when chance alone would agree on everything."""
    if not ratings:
        return None
    observed = sum(x == y for x, y in ratings) / len(ratings)
    first, second = Counter(x for x, _ in ratings), Counter(y for _, y in ratings)
    expected = sum(first[label] * second[label] for label in first) / len(ratings) ** 2
    return None if expected == 1 else round((observed - expected) / (1 - expected), 4)


def agreement(ratings: list[tuple[str, str]]) -> dict:
    return {"items": len(ratings),
            "percent": round(100 * sum(x == y for x, y in ratings) / len(ratings), 1) if ratings else None,
            "kappa": cohen_kappa(ratings)}


def voter_agreement(votes: list[dict]) -> dict:
    """Per pair of voters on the items both voted on; overall agreement and kappa weighted by shared items."""
    ballots: dict[str, dict[str, str]] = defaultdict(dict)
    for vote in votes:
        ballots[vote["item"]][vote["voter"]] = outcome(vote)
    shared: dict[tuple[str, str], list] = defaultdict(list)
    for by_voter in ballots.values():
        for first, second in combinations(sorted(by_voter), 2):
            shared[(first, second)].append((by_voter[first], by_voter[second]))
    pairs = [{"voters": list(voters), **agreement(ratings)} for voters, ratings in sorted(shared.items())]
    compared = sum(p["items"] for p in pairs)
    weighted = [(p["kappa"], p["items"]) for p in pairs if p["kappa"] is not None]
    return {"items_compared": compared,
            "percent": round(sum(p["percent"] * p["items"] for p in pairs) / compared, 1) if compared else None,
            "kappa": round(sum(k * n for k, n in weighted) / sum(n for _, n in weighted), 4) if weighted else None,
            "pairs_of_voters": pairs}


def load_judgments(path: str) -> list[dict]:
    records = read_json_records(Path(path), path)
    for where, record in records:
        missing = [name for name in ("key", "a", "b", "output_a", "output_b", "winner")
                   if not isinstance(record, dict) or name not in record]
        if missing:
            raise DataError(f"{path}: {where}: field '{missing[0]}' is missing (a judgments.jsonl written by judge)")
    return [record for _, record in records]


def judge_agreement(arena: dict, votes: list[dict], judgments: list[dict]) -> dict:
    """Each vote against the judge's verdict on the very same answers (either way round)."""
    verdicts = {}
    for j in judgments:
        if (j["a"], j["b"]) == (arena["a"], arena["b"]):
            verdicts[item_id(j["key"], j["output_a"], j["output_b"])] = j["winner"]
        elif (j["a"], j["b"]) == (arena["b"], arena["a"]):
            verdicts[item_id(j["key"], j["output_b"], j["output_a"])] = {"a": "b", "b": "a"}.get(j["winner"], "tie")
    ratings = [(outcome(vote), verdicts[vote["item"]]) for vote in votes if vote["item"] in verdicts]
    return {"judge": judgments[0].get("judge") if judgments else None, "votes_compared": len(ratings),
            **{name: value for name, value in agreement(ratings).items() if name != "items"}}


def arena_report(arena: dict, votes: list[dict], judgments: list[dict] | None) -> dict:
    rows = [{"winner": outcome(v), "category": v["category"]} for v in votes]
    voters = sorted({v["voter"] for v in votes})
    people = f"people ({len(voters)} voter{'s' if len(voters) != 1 else ''})"
    report = build_report(arena["a"], arena["b"], rows, judge=people, pairs_total=len(rows), usage=None,
                          with_position=False)
    decisive = [v for v in votes if v["choice"] in ("1", "2")]
    first = sum(v["choice"] == "1" for v in decisive)
    report.update(arena=arena["id"], a_file=arena["a_file"], b_file=arena["b_file"], answers_a=arena["answers_a"],
                  answers_b=arena["answers_b"], votes=len(votes), voters=voters,
                  items_voted=len({v["item"] for v in votes}), both_bad=sum(v["winner"] == "bad" for v in votes),
                  position_bias={"rate": round(first / len(decisive), 4) if decisive else None,
                                 "response_1_chosen": first, "response_2_chosen": len(decisive) - first},
                  voter_agreement=voter_agreement(votes))
    if judgments is not None:
        report["judge_agreement"] = judge_agreement(arena, votes, judgments)
    return report


def answers_line(report: dict, others: list[dict]) -> str:
    """Which answers these votes are about, and how they differ from other arenas of the same two names."""
    if report["answers_a"] is None:
        line = "answers: not recorded (votes cast before alpaca-lora recorded answer sets)"
    else:
        line = f"answers: {report['a']} {report['answers_a']}, {report['b']} {report['answers_b']}"
    for other in others:
        changed = [report[side] for side in ("a", "b") if other[f"answers_{side}"] != report[f"answers_{side}"]]
        line += (f"; {' and '.join(changed)}'s answers differ from arena {other['id']}'s: reported apart, never "
                 "pooled")
    return line


def format_arena_report(report: dict, others: list[dict] = ()) -> str:
    lines = [f"arena {report['arena']}: {report['votes']} votes from {len(report['voters'])} voters on "
             f"{report['items_voted']} items ({report['both_bad']} 'both are bad', counted as ties)",
             answers_line(report, list(others)),
             format_report(report).replace(f": {report['pairs']} pairs", f": {report['pairs']} votes")]
    bias = report["position_bias"]
    if bias["rate"] is not None:
        lines.append(f"position: Response 1 got {bias['rate']:.1%} of the decisive votes (50% is no bias)")
    together = report["voter_agreement"]
    if together["items_compared"]:
        kappa = "-" if together["kappa"] is None else f"{together['kappa']:.2f}"
        lines.append(f"voters agree on {together['percent']}% of {together['items_compared']} shared ratings "
                     f"(Cohen's kappa {kappa})")
    else:
        lines.append("voters agree: no item was voted on by two voters yet")
    if "judge_agreement" in report:
        with_judge = report["judge_agreement"]
        kappa = "-" if with_judge["kappa"] is None else f"{with_judge['kappa']:.2f}"
        lines.append(f"voters and the judge agree on {with_judge['percent']}% of {with_judge['votes_compared']} "
                     f"votes (Cohen's kappa {kappa})" if with_judge["votes_compared"] else
                     "voters and the judge: the judgments cover none of these answers")
    return "\n".join(lines)


def votes_csv(votes: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(votes)
    return out.getvalue()


def run_arena_report(cfg) -> int:
    store = ArenaStore(cfg.db)
    output_dir = Path(cfg.output_dir or Path(cfg.db).with_name(Path(cfg.db).stem + "-report"))
    judgments = load_judgments(cfg.judgments) if cfg.judgments else None
    reports = []
    arenas = store.arenas()
    for arena in arenas:
        votes = store.votes(arena["id"])
        if not votes:
            continue
        report = arena_report(arena, votes, judgments)
        write_report(report, output_dir, name=f"arena_{arena['id']}")
        others = [other for other in arenas if (other["a"], other["b"]) == (arena["a"], arena["b"])
                  and other["id"] < arena["id"]]
        print(format_arena_report(report, others) + "\n", flush=True)
        reports.append(report)
    every_vote = store.votes()
    atomic_write_text(output_dir / "votes.csv", votes_csv(every_vote))
    atomic_write_text(output_dir / "arena_report.json", json.dumps(reports, indent=2, ensure_ascii=False) + "\n")
    get_logger(__name__).info(f"{len(every_vote)} votes in {len(reports)} arenas: {output_dir / 'arena_report.json'}, "
                              f"charts arena_N.png, every vote in {output_dir / 'votes.csv'}")
    return 0
