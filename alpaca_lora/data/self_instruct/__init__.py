"""Building Alpaca-format instruction data with any OpenAI-compatible model, the way Stanford
Alpaca built its 52K (self-instruct), plus regenerating outputs and cleaning an existing set."""
