"""``python -m alpaca_lora COMMAND ...``: the same as ``alpaca-lora COMMAND ...`` (every command, recipes too)."""

import sys

from alpaca_lora.cli import main

if __name__ == "__main__":
    sys.exit(main())
