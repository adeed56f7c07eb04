"""``python -m alpaca_lora.train ...``: the same as ``alpaca-lora train ...`` (the form torchrun and Slurm use)."""

from alpaca_lora.train.run import main

if __name__ == "__main__":
    main()
