"""``alpaca-lora app ...`` (also ``python -m alpaca_lora.app ...``): see ``alpaca_lora.app.page``."""

from __future__ import annotations

import sys

from alpaca_lora.common.settings import entry_point, help_text


def main(argv: list[str] | None = None) -> int:
    from alpaca_lora.app.page import TOOL, AppConfig, load_app_config, run

    usage = "[adapter=DIR] [model=DIR] [port=7860] [feedback_db=FILE] [terms=FILE] [key=value ...]"
    return entry_point(argv, lambda: help_text(TOOL, usage, AppConfig), load_app_config, run) or 0


if __name__ == "__main__":
    sys.exit(main())
