"""Any OpenAI-compatible endpoint through the official ``openai`` client: one request with retries,
usage and price (``client``), and many requests in flight within a budget, journaled (``runner``).
The data builder's teacher and the evaluation's judge both run on it."""
