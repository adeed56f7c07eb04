"""``alpaca-lora evaluate answer|judge ...`` (also ``python -m alpaca_lora.evaluate answer|judge ...``)

- ``answer``: one model's answers on an evaluation set (Self-Instruct's 252 by default), from a local
  model (adapter=, model=) or an OpenAI-compatible endpoint (base_url=, model=).
- ``judge``: answers A against answers B (files, or a published name such as text-davinci-003), by an
  LLM judge in both orders, or by the reference answers (judge=reference); report.json, table, PNG.

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


COMMANDS = {
    "answer": Subcommand(settings.AnswerConfig, settings.load_answer_config,
                         "[set=self-instruct-252] (adapter=DIR | model=NAME [base_url=URL]) [output=FILE] "
                         "[key=value ...]", run_answer),
    "judge": Subcommand(settings.JudgeConfig, settings.load_judge_config,
                        "a=ANSWERS b=ANSWERS (judge_model=NAME [base_url=URL] | judge=reference) [output_dir=DIR]",
                        run_judge),
}


def main(argv: list[str] | None = None) -> int:
    """``argv`` starts with the command: answer or judge."""
    return dispatch(argv, "evaluate", COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
