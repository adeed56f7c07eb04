"""The app's generate handler: only the chosen decoding mode's controls reach the model."""

import asyncio

from alpaca_lora.app.page import respond
from alpaca_lora.inference.loading import inference_settings, load_for_inference


def run(loaded, mode, temperature, seed=0):
    import torch

    async def last():
        outputs = [o async for o in respond(loaded, "Tell me a story.", "", mode, temperature, 1.0, 0, 3, 12)]
        return outputs[-1]

    torch.manual_seed(seed)
    return asyncio.run(last())


def test_controls_take_effect_only_in_their_mode(tiny_model_dir):
    loaded = load_for_inference(inference_settings(model=str(tiny_model_dir)))
    loaded.start_engine()  # as build_page starts it
    greedy, prompt = run(loaded, "greedy", 0.1)
    assert run(loaded, "greedy", 1.9) == (greedy, prompt)  # the slider is ignored, not half-applied
    assert prompt == loaded.prompt("Tell me a story.")
    samples = {run(loaded, "sample", 2.0, seed)[0] for seed in range(3)}
    assert len(samples) > 1 and greedy not in samples
    assert run(loaded, "beam", 2.0)[0]  # beam search answers at once
