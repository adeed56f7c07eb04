"""Evaluating a fine-tuned model: exact match on checkable data (``exact_match``)."""
