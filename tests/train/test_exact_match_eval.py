"""Training's before/after exact match (``exact_match_eval``) scores a model: the demo prints it."""

import pytest

from alpaca_lora.evaluate.exact_match import exact_match


@pytest.mark.slow
def test_exact_match_scores_the_fact_adapter(fact_adapters, fact):
    from alpaca_lora.inference.loading import inference_settings, load_for_inference

    loaded = load_for_inference(inference_settings(adapter=str(fact_adapters[16])))
    wrong = {**fact, "output": "Somewhere else."}
    scored = exact_match(loaded.model, loaded.prompter, [fact, wrong], "test")
    assert (scored.correct, scored.total, scored.matches) == (1, 2, [True, False])
