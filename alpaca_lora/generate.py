"""Generate with a fine-tuned model: ``python -m alpaca_lora.generate [adapter=DIR] [model=DIR] ...``

One instruction (streamed), an interactive prompt (no ``instruction=``), or a whole file
(``input_file=`` to ``output_file=``, batched with left padding and resumable). The prompt is the
template the model was trained with; only the response is printed; decoding is explicit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from alpaca_lora.data.examples import encode_prompt
from alpaca_lora.data.loading import DataError, load_records
from alpaca_lora.data.templates import PromptTemplate
from alpaca_lora.errors import exit_on_user_error
from alpaca_lora.inference import Decoding, Generation, LoadedModel, ModelSettings, load_for_inference
from alpaca_lora.journal import Journal
from alpaca_lora.settings import ConfigError, build, key, parse_overrides, wants_help

TOOL = "alpaca_lora.generate"


@dataclass
class GenerateConfig(ModelSettings, Decoding):
    instruction: Optional[str] = key(None, "the instruction; without it (and without input_file) an interactive prompt")
    input: str = key("", "the input that goes with the instruction, if any")
    input_file: Optional[str] = key(None, "Alpaca-format .json/.jsonl of instructions to answer in batches")
    output_file: Optional[str] = key(None, "JSONL of answers for input_file; a rerun continues where it stopped")
    batch_size: int = key(8, "prompts per batch with input_file (left-padded)")


def load_generate_config(overrides: list[str]) -> GenerateConfig:
    cfg: GenerateConfig = build(GenerateConfig, [("command line", parse_overrides(overrides))], TOOL)
    cfg.validate()
    if cfg.input_file and not cfg.output_file:
        raise ConfigError("key 'output_file' must be set with input_file")
    if cfg.input_file and cfg.instruction:
        raise ConfigError("keys 'instruction' and 'input_file' exclude each other")
    if cfg.batch_size < 1:
        raise ConfigError("key 'batch_size' must be at least 1")
    return cfg


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    template: PromptTemplate,
    records: list[dict[str, str]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: str | None = None,
    **generation_kwargs,
) -> list[str]:
    """Responses to ``records`` (``instruction``/``input``); greedy unless ``generation_kwargs`` say otherwise."""
    was_training = model.training
    model.eval()
    generation_kwargs.setdefault("do_sample", False)
    responses = []
    batches = range(0, len(records), batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None):
        batch = records[start : start + batch_size]
        ids = [encode_prompt(tokenizer, template.format(r["instruction"], r.get("input", ""))) for r in batch]
        inputs = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt").to(model.device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **generation_kwargs,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        responses += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return responses


def print_streamed(loaded: LoadedModel, instruction: str, input_text: str, decoding: Decoding) -> None:
    for piece in Generation(loaded, loaded.prompt(instruction, input_text), decoding):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def interactive(loaded: LoadedModel, decoding: Decoding) -> None:
    print(f"{loaded.description}\nType an instruction (and an input, or Enter for none); "
          "an empty instruction or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            instruction = input("instruction> ").strip()
            if not instruction:
                return
            input_text = input("input> ").strip()
        except EOFError:
            return
        print_streamed(loaded, instruction, input_text, decoding)


def generate_file(loaded: LoadedModel, records: list[dict], source: str, cfg: GenerateConfig) -> None:
    journal = Journal(cfg.output_file, required="index")
    done = set()
    for number, entry in enumerate(journal.read(), start=1):
        index = entry["index"]
        if index >= len(records) or records[index]["instruction"] != entry.get("instruction"):
            raise DataError(f"{cfg.output_file}: line {number}: record [{index}] is not the one in {source}; "
                            "use another output_file")
        done.add(index)
    todo = [i for i in range(len(records)) if i not in done]
    kwargs = cfg.generate_kwargs()
    max_new_tokens = kwargs.pop("max_new_tokens")
    with tqdm(total=len(records), initial=len(done), desc="generating", unit="rec") as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            responses = generate_responses(loaded.model, loaded.tokenizer, loaded.template, [records[i] for i in batch],
                                           max_new_tokens, batch_size=cfg.batch_size, **kwargs)
            for index, response in zip(batch, responses):
                journal.append({"index": index, "instruction": records[index]["instruction"],
                                "input": records[index]["input"], "output": response})
            bar.update(len(batch))
    print(f"{len(records)} answers in {cfg.output_file}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv, TOOL, "[adapter=DIR] [model=DIR] [instruction=...] [key=value ...]", GenerateConfig):
        return 0
    with exit_on_user_error():
        cfg = load_generate_config(argv)
        data = load_records(cfg.input_file, need_output=False) if cfg.input_file else None  # checked before loading
        loaded = load_for_inference(cfg)
        if data is not None:
            generate_file(loaded, data.records, data.source, cfg)
        elif cfg.instruction:
            print_streamed(loaded, cfg.instruction, cfg.input, cfg)
        else:
            interactive(loaded, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
