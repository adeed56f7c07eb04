"""``alpaca-lora serve`` (``python -m alpaca_lora.serve``): an OpenAI-compatible API over the generation engine."""
