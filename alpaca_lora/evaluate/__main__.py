"""``alpaca-lora evaluate answer|judge|harness ...`` (also ``python -m alpaca_lora.evaluate ...``)

- ``answer``: one model's answers on an evaluation set (Self-Instruct's 252 by default), from a local
  model (adapter=, model=) or an OpenAI-compatible endpoint (base_url=, model=).
- ``judge``: answers A against answers B (files, or a published name such as text-davinci-003), by an
  LLM judge in both orders, or by the reference answers (judge=reference); report.json, table, PNG.
- ``harness``: lm-evaluation-harness's benchmarks on the model as it was trained (an adapter on its quantized
  base, or a merged model), with compare_base=true on the base too; report.json and a table.

The same comparison by people, blind, is ``alpaca-lora arena`` (alpaca_lora.arena).
"""

from __future__ import annotations

import sys

from alpaca_lora.common.settings import Subcommand, dispatch
from alpaca_lora.evaluate import settings


def run_answer(cfg) -> int:
    from alpaca_lora.evaluate.answer import run_answer

    return run_answer(cfg)


def run_judge(cfg) -> int:
    from alpaca_lora.evaluate.judge import run_judge

    return run_judge(cfg)


def run_harness(cfg) -> int:
    from alpaca_lora.evaluate.harness import run_harness

    return run_harness(cfg)


COMMANDS = {
    "answer": Subcommand(settings.AnswerConfig, settings.load_answer_config,
                         "[set=self-instruct-252] (adapter=DIR | model=NAME [base_url=URL]) [output=FILE] "
                         "[key=value ...]", run_answer),
    "judge": Subcommand(settings.JudgeConfig, settings.load_judge_config,
                        "a=ANSWERS b=ANSWERS (judge_model=NAME [base_url=URL] | judge=reference) [output_dir=DIR]",
                        run_judge),
    "harness": Subcommand(settings.HarnessConfig, settings.load_harness_config,
                          "tasks=NAME,FILE.yaml,DIR (adapter=DIR | model=NAME) [compare_base=true] [limit=N] "
                          "[num_fewshot=N] [output_dir=DIR]", run_harness),
}


def main(argv: list[str] | None = None) -> int:
    """``argv`` starts with the command: answer, judge or harness."""
    return dispatch(argv, "evaluate", COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
