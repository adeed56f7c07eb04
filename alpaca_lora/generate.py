"""Generation with the training prompt template: batched, left-padded, returning only the response."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from alpaca_lora.data.examples import encode_prompt
from alpaca_lora.data.templates import PromptTemplate


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    template: PromptTemplate,
    records: list[dict[str, str]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: str | None = None,
    **generation_kwargs,
) -> list[str]:
    """Responses to ``records`` (``instruction``/``input``); greedy unless ``generation_kwargs`` say otherwise."""
    was_training = model.training
    model.eval()
    generation_kwargs.setdefault("do_sample", False)
    responses = []
    batches = range(0, len(records), batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None):
        batch = records[start : start + batch_size]
        ids = [encode_prompt(tokenizer, template.format(r["instruction"], r.get("input", ""))) for r in batch]
        inputs = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt").to(model.device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **generation_kwargs,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        responses += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return responses
