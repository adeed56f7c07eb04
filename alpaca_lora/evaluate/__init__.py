"""Evaluating a fine-tuned model: exact match on checkable data (``exact_match``); answers on an
evaluation set (``answer``), a pairwise judge in both orders (``judge``) and a blind human arena
(``arena``), as Stanford Alpaca compared itself with text-davinci-003 (``python -m alpaca_lora.evaluate``)."""
