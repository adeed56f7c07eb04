"""Near-duplicate filter speed: Stanford's rouge_score-in-a-process-pool against our index, one run.

The pool is 20,000 instructions: the real ones in ../shared/data (Alpaca, Self-Instruct seeds and
user-oriented instructions) plus word-level variants of them (the near-duplicates a generator
produces). Each query instruction is checked against the whole pool by both methods, exactly as
the generator does; the decisions must be identical and the times are compared.

    python bench/dedup.py [--pool 20000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

from rouge_score import rouge_scorer
from tqdm import tqdm

from alpaca_lora.data.near_duplicates import NearDuplicateIndex

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def real_instructions(shared: Path = SHARED) -> list[str]:
    """Every distinct instruction in the shared Alpaca, seed-task and user-oriented files."""
    texts = [r["instruction"] for r in json.loads((shared / "alpaca_en_demo.json").read_text())]
    for name in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl"):
        texts += [json.loads(line)["instruction"] for line in (shared / name).read_text().splitlines() if line]
    return list(dict.fromkeys(texts))


def variants(instructions: list[str], count: int, seed: int = 0) -> list[str]:
    """Word-level edits of real instructions (drop, swap, replace, splice), from light to heavy."""
    rng = random.Random(seed)
    vocabulary = sorted({w for text in instructions for w in text.split()})
    made = []
    while len(made) < count:
        words = rng.choice(instructions).split()
        for _ in range(rng.randint(1, 4)):
            edit = rng.choice(("drop", "swap", "replace", "splice"))
            i = rng.randrange(len(words))
            if edit == "drop" and len(words) > 4:
                del words[i]
            elif edit == "swap" and len(words) > 1:
                j = min(i + 1, len(words) - 1)
                words[i], words[j] = words[j], words[i]
            elif edit == "replace":
                words[i] = rng.choice(vocabulary)
            elif edit == "splice":
                other = rng.choice(instructions).split()
                words = words[: i + 1] + other[len(other) // 2:]
        made.append(" ".join(words))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--similarity", type=float, default=0.7)
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"bench/dedup.py needs the real instructions in {SHARED}")

    rng = random.Random(0)
    real = real_instructions()
    rng.shuffle(real)
    held_out, pool_source = real[: args.queries // 2], real[args.queries // 2:]
    pool = pool_source + variants(pool_source, args.pool - len(pool_source), seed=1)
    queries = held_out + variants(pool_source, args.queries - len(held_out), seed=2)
    print(f"pool {len(pool)} instructions ({len(pool_source)} real), {len(queries)} queries "
          f"({len(held_out)} real and unseen, the rest variants), {os.cpu_count()} CPUs")

    index = NearDuplicateIndex(args.similarity)
    start = time.perf_counter()
    for text in pool:
        index.add(text)
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = [index.is_near_duplicate(q) for q in tqdm(queries, desc="index")]
    ours_seconds = time.perf_counter() - start

    # Stanford's generate_instruction.py: tokenize once, then score every pair in a process pool.
    pool_tokens = [index.tokenize(text) for text in pool]
    baseline = []
    with Pool(os.cpu_count()) as workers:
        start = time.perf_counter()
        for query in tqdm(queries, desc="rouge_score pool"):
            scores = workers.map(partial(rouge_scorer._score_lcs, index.tokenize(query)), pool_tokens)
            baseline.append(max(score.fmeasure for score in scores) > args.similarity)
        baseline_seconds = time.perf_counter() - start

    mismatches = sum(a != b for a, b in zip(ours, baseline))
    ratio = baseline_seconds / ours_seconds
    per_query = 1000 * baseline_seconds / len(queries)
    print(f"rouge_score in a process pool: {baseline_seconds:.2f} s ({per_query:.1f} ms per query)")
    print(f"our index:                     {ours_seconds:.3f} s "
          f"({1000 * ours_seconds / len(queries):.2f} ms per query; "
          f"building it for the pool: {build_seconds:.2f} s once)")
    print(f"near-duplicates found: {sum(ours)} of {len(queries)}; decisions that differ: {mismatches}")
    print(f"speed-up: {ratio:.0f}x")
    print(json.dumps({"benchmark": "dedup", "pool": len(pool), "queries": len(queries),
                      "baseline_seconds": round(baseline_seconds, 3), "ours_seconds": round(ours_seconds, 4),
                      "index_build_seconds": round(build_seconds, 3), "near_duplicates": sum(ours),
                      "mismatches": mismatches, "ratio": round(ratio, 1)}))
    if mismatches:
        sys.exit("decisions differ from rouge_score")


if __name__ == "__main__":
    main()
