"""What the page asks of the model: its controls as decoding settings, a generation streamed and cancellable,
and a refusal shown to the visitor."""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import asdict

from alpaca_lora.inference.generation import Decoding, Generation
from alpaca_lora.inference.loading import LoadedModel


def page_decoding(mode: str, temperature: float, top_p: float, top_k: int, num_beams: int,
                  max_new_tokens: int) -> Decoding:
    """The page's controls as decoding settings: only the chosen mode's reach the model."""
    settings = {"sample": {"temperature": temperature, "top_p": top_p, "top_k": int(top_k) or None},
                "beam": {"num_beams": int(num_beams)}}.get(mode, {})
    decoding = Decoding(decoding=mode, max_new_tokens=int(max_new_tokens), **settings)
    decoding.validate()
    return decoding


def decoding_record(decoding: Decoding) -> dict:
    """The settings that reached the model, as the feedback database keeps them."""
    return {name: value for name, value in asdict(decoding).items() if value is not None}


async def stream(loaded: LoadedModel, prompt: str, decoding: Decoding):
    """Yields (response so far, finish reason: None until it ends). Stop (or a visitor who leaves) cancels
    the task, and with it the generation, at once."""
    text = ""
    yield text, None
    generation = Generation(loaded, prompt, decoding)
    async with aclosing(generation.__aiter__()) as pieces:
        async for piece in pieces:
            text += piece
            yield text, None
    yield text, generation.finish_reason


def shown(exc: Exception):
    """An error the visitor sees as it is (Gradio hides other exceptions' messages)."""
    import gradio as gr

    return gr.Error(str(exc))
