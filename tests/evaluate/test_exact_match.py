"""Exact match, as training scores ``exact_match_eval`` rows before and after: greedy answers against references."""

from __future__ import annotations

import pytest

from alpaca_lora.data.templates import Prompter, get_template


@pytest.mark.slow
def test_exact_match_scores_greedy_answers_against_the_references(fact_adapters, fact, tiny_model_dir,
                                                                   tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alpaca_lora.evaluate.exact_match import exact_match

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(fact_adapters[16]))
    records = [fact, dict(fact, output="Zorbtown.")]  # the adapter learned the first answer, not the second
    scored = exact_match(model.eval(), Prompter(get_template("alpaca"), tiny_tokenizer), records, "test")
    assert (scored.total, scored.correct, scored.matches) == (2, 1, [True, False])
    assert scored.responses == ["Quibbletown.", "Quibbletown."]
