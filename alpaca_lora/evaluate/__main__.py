"""``python -m alpaca_lora.evaluate answer|judge|arena|arena report key=value ...``

- ``answer``: one model's answers on an evaluation set (Self-Instruct's 252 by default), from a local
  model (adapter=, model=) or an OpenAI-compatible endpoint (base_url=, model=).
- ``judge``: answers A against answers B (files, or a published name such as text-davinci-003), by an
  LLM judge in both orders, or by the reference answers (judge=reference); report.json, table, PNG.
- ``arena``: the same comparison by people, blind, in the browser; ``arena report``: their tallies.
"""

from __future__ import annotations

import sys

from alpaca_lora.errors import exit_on_user_error
from alpaca_lora.evaluate.settings import TOOL, AnswerConfig, ArenaConfig, ArenaReportConfig, JudgeConfig, load_settings
from alpaca_lora.settings import wants_help

COMMANDS = {
    "answer": (AnswerConfig, "[set=self-instruct-252] (adapter=DIR | model=NAME [base_url=URL]) [output=FILE] ..."),
    "judge": (JudgeConfig, "a=ANSWERS b=ANSWERS (judge_model=NAME [base_url=URL] | judge=reference) [output_dir=DIR]"),
    "arena": (ArenaConfig, "a=ANSWERS b=ANSWERS [db=arena.sqlite] [port=7861] [share=true] [auth_env=NAME]"),
    "arena report": (ArenaReportConfig, "db=FILE [judgments=FILE] [output_dir=DIR]"),
}


def usage() -> str:
    return "usage:\n" + "\n".join(f"  python -m {TOOL} {name} {arguments}" for name, (_, arguments) in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(argv[:2]) if argv[:2] == ["arena", "report"] else (argv[0] if argv else None)
    if command not in COMMANDS:
        wanted_help = not argv or argv[0] in ("-h", "--help")
        print(usage() if wanted_help else f"error: unknown command {argv[0]!r}\n{usage()}",
              file=sys.stdout if wanted_help else sys.stderr)
        return 0 if wanted_help else 2
    rest = argv[len(command.split()):]
    schema, arguments = COMMANDS[command]
    if wants_help(rest, f"{TOOL} {command}", arguments, schema):
        return 0
    with exit_on_user_error():
        cfg = load_settings(schema, rest, f"{TOOL} {command}")
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


if __name__ == "__main__":
    sys.exit(main())
