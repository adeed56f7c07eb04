"""Exact match, as training scores its held-out examples before and after (the demo's 'skills')."""

from alpaca_lora.data.templates import get_template
from alpaca_lora.evaluate.exact_match import exact_match, is_exact_match


def test_exact_match_scores_a_model_on_records(tiny_model_dir, tiny_tokenizer, fact):
    """The demo trains with exact_match_eval=100: its first step scores the base (after the restructure this import
    failed, and `make demo` with it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    records = [fact, {"instruction": "Name a color.", "input": "", "output": "Blue."}]
    result = exact_match(model, tiny_tokenizer, get_template("alpaca"), records, "before training")
    assert result.total == 2 and len(result.responses) == 2 and all(isinstance(r, str) for r in result.responses)
    assert result.matches == [is_exact_match(r, rec["output"]) for r, rec in zip(result.responses, records)]
    assert result.accuracy == sum(result.matches) / 2
