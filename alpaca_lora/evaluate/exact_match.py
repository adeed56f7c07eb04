"""Evaluation of a fine-tuned model. Exact match: for data with checkable answers (the demo's skills)."""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_lora.data.templates import PromptTemplate
from alpaca_lora.generate import generate_responses


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
    reference_ids = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    max_new_tokens = max(map(len, reference_ids), default=1) + 4
    responses = generate_responses(model, tokenizer, template, records, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=f"exact match ({label})")
    matches = [response == record["output"].strip() for response, record in zip(responses, records)]
    return ExactMatch(sum(matches) / max(len(records), 1), sum(matches), len(records), responses, matches)
