"""``python -m alpaca_lora.serve ...``: the same as ``alpaca-lora serve ...``."""

import sys

from alpaca_lora.serve.server import main

if __name__ == "__main__":
    sys.exit(main())
