"""Tallies of pairwise outcomes in Alpaca's form ("A wins 90 vs B 89, 73 ties"), the win rate of A
with ties counted half and a bootstrap 95% interval, per category and overall: as ``report.json``, a
printed table and a PNG bar chart. The judge's report and the arena's share them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from alpaca_lora.common.paths import atomic_path, atomic_write_text

BOOTSTRAP_SAMPLES = 10_000
SCORE = {"a": 1.0, "tie": 0.5, "b": 0.0}


def tally(outcomes: list[str]) -> dict:
    """Counts of 'a', 'b' and 'tie' outcomes, the win rate of A (ties half) and its bootstrap 95% interval."""
    counts = Counter(outcomes)
    scores = np.array([SCORE[outcome] for outcome in outcomes])
    return {"pairs": len(outcomes), "wins_a": counts["a"], "wins_b": counts["b"], "ties": counts["tie"],
            "win_rate_a": round(float(scores.mean()), 4) if len(scores) else None, "ci95": bootstrap_ci(scores)}


def bootstrap_ci(scores: np.ndarray, seed: int = 0) -> list[float] | None:
    """Percentile interval of the mean over resampled pairs (seeded: the same data gives the same interval)."""
    if not len(scores):
        return None
    rng = np.random.default_rng(seed)
    means = rng.choice(scores, size=(BOOTSTRAP_SAMPLES, len(scores)), replace=True).mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def per_category(rows: list[dict]) -> dict:
    """Tallies by ``category``; {} when the set has no categories."""
    if not any(row.get("category") for row in rows):
        return {}
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row.get("category") or "(none)", []).append(row["winner"])
    return {name: tally(outcomes) for name, outcomes in sorted(groups.items())}


def build_report(a: str, b: str, judged: list[dict], judge: str, pairs_total: int, usage: dict | None,
                 with_position: bool) -> dict:
    overall = tally([j["winner"] for j in judged])
    report = {"a": a, "b": b, "judge": judge, **overall, "pairs_total": pairs_total,
              "complete": len(judged) == pairs_total,
              "summary": f"{a} wins {overall['wins_a']} vs {b} {overall['wins_b']}, {overall['ties']} ties",
              "position_bias": position_bias(judged) if with_position else None,
              "per_category": per_category(judged), "usage": usage}
    if with_position:
        report["unparseable_replies"] = sum(j.get("unparseable", 0) for j in judged)
    return report


def position_bias(judged: list[dict]) -> dict:
    """How often both orders named the same position, i.e. the verdict followed the position, not the response."""
    first = sum(j["verdicts"] == ["A", "A"] for j in judged)
    second = sum(j["verdicts"] == ["B", "B"] for j in judged)
    return {"rate": round((first + second) / len(judged), 4) if judged else None,
            "first_both_times": first, "second_both_times": second}


def write_report(report: dict, output_dir: Path, name: str = "report") -> None:
    atomic_write_text(output_dir / f"{name}.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    title = f"{report['a']} (A) vs {report['b']} (B), judged by {report['judge']}"
    plot_tallies(report, output_dir / f"{name}.png", title)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_report(report: dict) -> str:
    lines = [f"{report['a']} (A) vs {report['b']} (B), judged by {report['judge']}: {report['pairs']} pairs"
             + ("" if report.get("complete", True) else f" of {report['pairs_total']} (incomplete)"),
             report["summary"]]
    low, high = report["ci95"]
    lines.append(f"win rate of A {_percent(report['win_rate_a'])} (95% CI {_percent(low)} to {_percent(high)}), "
                 "ties counted half")
    bias = report.get("position_bias")
    if bias and bias.get("rate") is not None and "first_both_times" in bias:
        lines.append(f"position bias: {_percent(bias['rate'])} of pairs got the same position in both orders "
                     f"(first {bias['first_both_times']}, second {bias['second_both_times']})")
    missing = report.get("no_verdict")
    if missing and missing["judgments"]:
        lines.append(f"no verdict: {missing['judgments']} of {missing['of']} judgments (counted as ties)")
    usage = report.get("usage")
    if usage:
        cost = "" if usage.get("cost_usd") is None else f", ${usage['cost_usd']:,.4f}"
        cached = f"; {usage['from_cache']} judgments from the judgment cache" if usage.get("from_cache") else ""
        lines.append(f"usage: {usage['requests']} requests ({usage['requests_this_run']} this run), "
                     f"{usage['prompt_tokens'] + usage['completion_tokens']:,} tokens{cost}{cached}")
    rows = [("overall", report)] + list(report["per_category"].items())
    width = max(len(name) for name, _ in rows) + 2
    lines.append(f"{'':<{width}}{'pairs':>7}{'A wins':>8}{'B wins':>8}{'ties':>6}{'win rate A':>12}{'95% CI':>18}")
    for name, row in rows:
        interval = f"{_percent(row['ci95'][0])}-{_percent(row['ci95'][1])}"
        lines.append(f"{name:<{width}}{row['pairs']:>7}{row['wins_a']:>8}{row['wins_b']:>8}{row['ties']:>6}"
                     f"{_percent(row['win_rate_a']):>12}{interval:>18}")
    return "\n".join(lines)


def print_report(report: dict) -> None:
    print(format_report(report), flush=True)


def plot_tallies(report: dict, path: Path, title: str) -> None:
    """One horizontal bar per category and one for all pairs: the shares of A wins, ties and B wins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("overall", report)] + sorted(report["per_category"].items(), key=lambda kv: -kv[1]["win_rate_a"])
    fig, ax = plt.subplots(figsize=(8, 1.7 + 0.3 * len(rows)), dpi=120)
    labels = [f"{name} ({row['pairs']})" for name, row in rows]
    left = np.zeros(len(rows))
    for field, label, color in (("wins_a", f"A wins: {report['a']}", "#3b75af"), ("ties", "tie", "#c8c8c8"),
                                ("wins_b", f"B wins: {report['b']}", "#ef8636")):
        shares = np.array([row[field] / row["pairs"] for _, row in rows])
        ax.barh(labels, shares, left=left, height=0.7, color=color, label=label, edgecolor="white")
        for y, (share, start, (_, row)) in enumerate(zip(shares, left, rows)):
            if share >= 0.06:
                ax.text(start + share / 2, y, str(row[field]), ha="center", va="center", fontsize=8)
        left += shares
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of pairs (counts in the bars; ties counted apart)")
    ax.set_title(title, fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / (1.7 + 0.3 * len(rows)), 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
