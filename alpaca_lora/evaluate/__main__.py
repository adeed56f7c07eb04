"""``alpaca-lora evaluate answer|judge ...`` and ``alpaca-lora arena [report] ...`` (also
``python -m alpaca_lora.evaluate answer|judge|arena|arena report ...``)

- ``answer``: one model's answers on an evaluation set (Self-Instruct's 252 by default), from a local
  model (adapter=, model=) or an OpenAI-compatible endpoint (base_url=, model=).
- ``judge``: answers A against answers B (files, or a published name such as text-davinci-003), by an
  LLM judge in both orders, or by the reference answers (judge=reference); report.json, table, PNG.
- ``arena``: the same comparison by people, blind, in the browser; ``arena report``: their tallies.
"""

from __future__ import annotations

import sys

from alpaca_lora.evaluate import settings
from alpaca_lora.settings import COMMAND, entry_point, help_text

# command: (settings, loader, arguments for --help)
COMMANDS = {
    "answer": (settings.AnswerConfig, settings.load_answer_config,
               "[set=self-instruct-252] (adapter=DIR | model=NAME [base_url=URL]) [output=FILE] [key=value ...]"),
    "judge": (settings.JudgeConfig, settings.load_judge_config,
              "a=ANSWERS b=ANSWERS (judge_model=NAME [base_url=URL] | judge=reference) [output_dir=DIR]"),
    "arena": (settings.ArenaConfig, settings.load_arena_config,
              "a=ANSWERS b=ANSWERS [db=arena.sqlite] [port=7861] [share=true] [auth_env=NAME]"),
    "arena report": (settings.ArenaReportConfig, settings.load_arena_report_config,
                     "db=FILE [judgments=FILE] [output_dir=DIR]"),
}


def usage() -> str:
    return "usage:\n" + "\n".join(
        f"  {COMMAND} {name if name.startswith('arena') else 'evaluate ' + name} {arguments}"
        for name, (_, _, arguments) in COMMANDS.items())


def run(command: str, cfg) -> int:
    if command == "answer":
        from alpaca_lora.evaluate.answer import run_answer

        return run_answer(cfg)
    if command == "judge":
        from alpaca_lora.evaluate.judge import run_judge

        return run_judge(cfg)
    if command == "arena report":
        from alpaca_lora.evaluate.arena_report import run_arena_report

        return run_arena_report(cfg)
    from alpaca_lora.evaluate.arena import run_arena

    return run_arena(cfg)


def main(argv: list[str] | None = None) -> int:
    """``argv`` starts with the command: answer, judge, arena, or arena report."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "arena report" if argv[:2] == ["arena", "report"] else (argv[0] if argv else "")
    if command not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'\n\n{usage()}", file=sys.stderr)
            return 2
        print(usage())
        return 0 if argv else 2
    schema, load, arguments = COMMANDS[command]
    tool = command if command.startswith("arena") else f"evaluate {command}"
    return entry_point(argv[len(command.split()):], lambda: help_text(tool, arguments, schema), load,
                       lambda cfg: run(command, cfg)) or 0


if __name__ == "__main__":
    sys.exit(main())
