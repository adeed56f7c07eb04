"""Exact match: for data with checkable answers (the demo's skills), the share of greedy responses
equal to the reference output, and the before/after report training prints."""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_lora.data.templates import PromptTemplate


def is_exact_match(response: str, reference: str) -> bool:
    """The response is the reference answer, surrounding whitespace aside."""
    return response.strip() == reference.strip()


@dataclass
class ExactMatch:
    accuracy: float
    correct: int
    total: int
    responses: list[str]
    matches: list[bool]


def exact_match(model, tokenizer, template: PromptTemplate, records: list[dict[str, str]], label: str,
                batch_size: int = 16) -> ExactMatch:
    """Share of records whose greedy response equals the reference output (whitespace-trimmed).

    Generation stops a few tokens past the longest reference: a longer answer cannot match anyway.
    """
    from alpaca_lora.inference.generation import generate_batch  # torch: only when a model is scored

    reference_ids = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    max_new_tokens = max(map(len, reference_ids), default=1) + 4
    prompts = [template.format(r["instruction"], r.get("input", "")) for r in records]
    responses = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=f"exact match ({label})")
    matches = [is_exact_match(response, record["output"]) for response, record in zip(responses, records)]
    return ExactMatch(sum(matches) / max(len(records), 1), sum(matches), len(records), responses, matches)


def print_before_after(records: list[dict], before: ExactMatch, after: ExactMatch, samples: int = 5) -> None:
    """The accuracy table and a few samples, right and wrong."""
    print(f"\n{'exact match on ' + str(len(records)) + ' held-out examples':<44}{'before':>10}{'after':>10}")
    print(f"{'accuracy':<44}{before.accuracy:>10.1%}{after.accuracy:>10.1%}")
    print(f"{'correct':<44}{before.correct:>10}{after.correct:>10}\n")
    rows = list(zip(records, before.responses, after.responses, after.matches))
    right = [row[:3] for row in rows if row[3]]
    wrong = [row[:3] for row in rows if not row[3]]
    for record, old, new in right[: samples - min(2, len(wrong))] + wrong[:2]:  # some of each
        prompt = record["instruction"] + (f" | {record['input']}" if record["input"] else "")
        print(f"  {prompt}\n    expected: {record['output']!r}\n    before:   {old[:80]!r}\n    after:    {new[:80]!r}")
    print()
