"""The fast near-duplicate filter takes exactly rouge_score's decisions (Stanford's generator)."""

import importlib.util
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from alpaca_lora.data.near_duplicates import NearDuplicateIndex

BENCH = Path(__file__).resolve().parents[2] / "bench" / "dedup.py"


def stanford_greedy(instructions, pool, threshold=0.7):
    """Stanford's loop: score against every kept instruction with rouge_score; keep if max <= threshold."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept_tokens = [scorer._tokenizer.tokenize(text) for text in pool]
    decisions = []
    for text in instructions:
        tokens = scorer._tokenizer.tokenize(text)
        duplicate = any(rouge_scorer._score_lcs(tokens, other).fmeasure > threshold for other in kept_tokens)
        decisions.append(duplicate)
        if not duplicate:
            kept_tokens.append(tokens)
    return decisions


def indexed_greedy(instructions, pool, threshold=0.7):
    index = NearDuplicateIndex(threshold)
    for text in pool:
        index.add(text)
    decisions = []
    for text in instructions:
        duplicate = index.is_near_duplicate(text)
        decisions.append(duplicate)
        if not duplicate:
            index.add(text)
    return decisions


def test_decisions_match_rouge_score_at_the_exact_threshold():
    # F1 = 2*LCS/(m+n) lands exactly on 0.7 here (LCS 7 of 10 and 10 words), and just around it.
    base = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    cases = [
        "alpha beta gamma delta epsilon zeta eta x y z",          # F1 = 0.7 exactly: kept
        "alpha beta gamma delta epsilon zeta eta theta y z",      # 0.8: dropped
        "Alpha, BETA; gamma-delta epsilon zeta eta theta iota!",  # rouge's tokenizer: punctuation and case
        "kappa iota theta eta zeta epsilon delta gamma beta alpha",  # same bag, LCS 1
        "alpha beta gamma delta epsilon zeta eta",                # 7 of 7 vs 10: 14/17 > 0.7
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron",
        "!!! ???",                                                # no tokens at all: never a duplicate
        "",
    ]
    for threshold in (0.7, 0.5, 14 / 17, 0.0, 1.0):
        assert indexed_greedy(cases, [base], threshold) == stanford_greedy(cases, [base], threshold), threshold


def test_decisions_match_rouge_score_on_synthetic_near_duplicates():
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12))) for _ in range(400)]
    assert indexed_greedy(texts, []) == stanford_greedy(texts, [])


@pytest.mark.slow
def test_decisions_match_rouge_score_on_real_instructions(shared_data):
    """2,000 instructions (every real one in ../shared/data, then word-level variants of them) through
    Stanford's greedy loop, starting from a pool of 100 real ones."""
    spec = importlib.util.spec_from_file_location("bench_dedup", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    real = bench.real_instructions(shared_data)
    rng = random.Random(0)
    rng.shuffle(real)
    pool, stream = real[:100], real[100:] + bench.variants(real, 2000 - len(real), seed=3)
    rng.shuffle(stream)
    ours = indexed_greedy(stream, pool)
    assert ours == stanford_greedy(stream, pool)
    assert 300 < sum(ours) < 1500, sum(ours)  # both kinds of decision are exercised
