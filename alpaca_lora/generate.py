"""Generate with a fine-tuned model: ``alpaca-lora generate [adapter=DIR] [model=DIR] ...``

One instruction (streamed), an interactive prompt (no ``instruction=``), or a whole file
(``input_file=`` to ``output_file=``, through the generation engine's batches, resumable). The prompt is the
template the model was trained with; only the response is printed; decoding is explicit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from tqdm.auto import tqdm

from alpaca_lora.common.errors import UserError
from alpaca_lora.common.journal import Journal
from alpaca_lora.common.settings import check, entry_point, help_text, key
from alpaca_lora.data.loading import load_records
from alpaca_lora.inference.engine import EngineSettings, PromptTooLong
from alpaca_lora.inference.generation import Decoding, Generation
from alpaca_lora.inference.loading import InferenceModel, LoadedModel, load_for_inference, load_inference_settings

TOOL = "generate"
MULTILINE = '"""'


@dataclass
class GenerateConfig(InferenceModel, Decoding):
    instruction: Optional[str] = key(None, "the instruction; without it (and without input_file) an interactive prompt")
    input: str = key("", "the input that goes with the instruction, if any")
    input_file: Optional[str] = key(None, "Alpaca-format .json/.jsonl of instructions to answer in batches")
    output_file: Optional[str] = key(None, "JSONL of answers for input_file; a rerun continues where it stopped")
    batch_size: int = key(8, "prompts generated together with input_file")


def load_generate_config(argv: list[str]) -> GenerateConfig:
    cfg: GenerateConfig = load_inference_settings(GenerateConfig, argv, TOOL)
    cfg.validate()
    check([
        (not cfg.input_file or cfg.output_file, "output_file", "must be set with input_file"),
        (not (cfg.input_file and cfg.instruction is not None), "instruction", "and 'input_file' exclude each other"),
        (cfg.batch_size >= 1, "batch_size", "must be at least 1"),
    ])
    return cfg


def print_streamed(loaded: LoadedModel, instruction: str, input_text: str, decoding: Decoding) -> None:
    """The response as it is generated; an instruction the model's context cannot hold is one error line."""
    try:
        for piece in Generation(loaded, loaded.prompt(instruction, input_text), decoding):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except PromptTooLong as exc:
        raise UserError(f"the instruction: {exc}") from None
    sys.stdout.write("\n")
    sys.stdout.flush()


def read_text(label: str) -> str:
    """One line, or every line from an opening triple quote to a closing one (as Ollama's prompt reads them)."""
    line = input(label).strip()
    if not line.startswith(MULTILINE):
        return line
    text = line[len(MULTILINE):]
    while not text.endswith(MULTILINE):
        text += "\n" + input("... ")
    return text[: -len(MULTILINE)].strip("\n")


def interactive(loaded: LoadedModel, decoding: Decoding) -> None:
    print(f"{loaded.description}\nType an instruction (and an input, or Enter for none); text between a pair of "
          f'{MULTILINE} may span lines. An empty instruction or Ctrl-D quits.', file=sys.stderr)
    while True:
        try:
            instruction = read_text("instruction> ")
            if not instruction:
                return
            input_text = read_text("input> ")
        except EOFError:
            return
        try:
            print_streamed(loaded, instruction, input_text, decoding)
        except UserError as exc:  # one instruction too long: say so, and ask for the next
            print(f"error: {exc}", file=sys.stderr)


def generate_file(loaded: LoadedModel, records: list[dict], source: str, cfg: GenerateConfig) -> int:
    """Answers the records not answered yet, written in the file's order as soon as those before them are; a
    record the model cannot answer (its prompt longer than the context) is skipped and reported (exit code 1),
    the others answered. A rerun retries only what is missing."""
    journal = Journal(cfg.output_file, required="index")
    done = journal.done_indices(records, source)
    todo = [i for i in range(len(records)) if i not in done]
    prompts = [loaded.encode(loaded.prompt(records[i]["instruction"], records[i]["input"])) for i in todo]
    finished, written, skipped = {}, 0, []
    with tqdm(total=len(records), initial=len(done), desc="generating", unit="rec") as bar:
        for position, request in loaded.engine().generate_many(prompts, cfg.sampling(), raise_errors=False):
            finished[position] = None if request.error else request.text
            skipped += [(todo[position], request.error)] if request.error else []
            while written in finished:
                index, output = todo[written], finished.pop(written)
                if output is not None:
                    journal.append({"index": index, "instruction": records[index]["instruction"],
                                    "input": records[index]["input"], "output": output})
                written += 1
            bar.update(1)
    print(f"{len(records) - len(skipped)} of {len(records)} answers in {cfg.output_file}", file=sys.stderr)
    for index, error in sorted(skipped):
        print(f"error: record [{index}]: {error}; skipped (a rerun tries it again)", file=sys.stderr)
    return 1 if skipped else 0


def run(cfg: GenerateConfig) -> int:
    data = load_records(cfg.input_file, need_output=False) if cfg.input_file else None  # checked before loading
    loaded = load_for_inference(cfg)
    loaded.start_engine(EngineSettings(max_batch=cfg.batch_size if data is not None else 1))  # its KV cache is sized so
    if data is not None:
        return generate_file(loaded, data.records, data.source, cfg)
    if cfg.instruction is not None:
        print_streamed(loaded, cfg.instruction, cfg.input, cfg)
    else:
        interactive(loaded, cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    usage = "[adapter=DIR] [model=DIR] [instruction=...] [input=...] [key=value ...]"
    return entry_point(argv, lambda: help_text(TOOL, usage, GenerateConfig, __doc__.split("\n\n")[1]),
                       load_generate_config, run) or 0


if __name__ == "__main__":
    sys.exit(main())
