"""``python -m alpaca_lora.plan ...``: the memory planner (alpaca_lora.train.plan), the same as ``alpaca-lora plan``."""

import sys

from alpaca_lora.train.plan import main

if __name__ == "__main__":
    sys.exit(main())
