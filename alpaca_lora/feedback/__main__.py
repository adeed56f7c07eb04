"""``alpaca-lora feedback export ...`` (also ``python -m alpaca_lora.feedback export ...``)

- ``export``: the app's votes (``feedback_db=``) and the arena's (``arena_db=``) as TRL's preference data:
  ``dpo.jsonl`` (prompt, chosen, rejected), ``kto.jsonl`` (prompt, completion, label) and ``summary.json``, the
  prompts in the template the adapter to tune was trained with; then ``alpaca-lora train recipe=dpo`` (or kto).
"""

from __future__ import annotations

import sys

from alpaca_lora.common.settings import Subcommand, dispatch
from alpaca_lora.feedback import settings


def run_export(cfg) -> int:
    from alpaca_lora.feedback.export import run_export

    return run_export(cfg)


COMMANDS = {
    "export": Subcommand(settings.ExportConfig, settings.load_export_config,
                         "(feedback_db=FILE | arena_db=FILE ...) [adapter=DIR | template=NAME] "
                         "[output_dir=outputs/feedback]", run_export),
}


def main(argv: list[str] | None = None) -> int:
    """``argv`` starts with the command: export."""
    return dispatch(argv, "feedback", COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
