"""``alpaca-lora arena ...`` and ``alpaca-lora arena report ...`` (also ``python -m alpaca_lora.arena [report] ...``)

- ``arena``: answers A against answers B, blind, by people in the browser; each vote kept in SQLite.
- ``arena report``: the votes tallied, with the agreement between voters and with a judge's judgments.
"""

from __future__ import annotations

import sys

from alpaca_lora.arena import settings
from alpaca_lora.common.settings import Subcommand, dispatch


def run_arena(cfg) -> int:
    from alpaca_lora.arena.page import run_arena

    return run_arena(cfg)


def run_report(cfg) -> int:
    from alpaca_lora.arena.report import run_arena_report

    return run_arena_report(cfg)


COMMANDS = {
    "": Subcommand(settings.ArenaConfig, settings.load_arena_config,
                   "a=ANSWERS b=ANSWERS [db=outputs/arena/arena.sqlite] [port=7861] [share=true] [auth_env=NAME]",
                   run_arena),
    "report": Subcommand(settings.ArenaReportConfig, settings.load_arena_report_config,
                         "[db=outputs/arena/arena.sqlite] [judgments=FILE] [output_dir=DIR]", run_report),
}


def main(argv: list[str] | None = None) -> int:
    """``argv``: the arena's keys, or ``report`` and its keys."""
    return dispatch(argv, "arena", COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
