"""A Gradio page to try a fine-tuned model: ``alpaca-lora app [adapter=DIR] [model=DIR] [port=7860]``

Instruction and input boxes, decoding controls that take effect (only the ones the chosen mode
uses can be changed), streamed output, a stop button, example prompts, and the exact prompt the
model was sent. Binds 127.0.0.1; ``share=true`` and basic auth (``auth_env=NAME``, a variable
holding ``user:password``) are opt-in.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Optional

from alpaca_lora.errors import ConfigError
from alpaca_lora.inference import (
    Decoding,
    Generation,
    InferenceModel,
    LoadedModel,
    load_for_inference,
    load_inference_settings,
)
from alpaca_lora.settings import entry_point, help_text, key

TOOL = "app"
EXAMPLES = [
    ["Give three tips for staying healthy.", ""],
    ["Translate the sentence into French.", "Where is the train station?"],
    ["Classify the sentiment of the review as positive, negative or neutral.", "The food was cold and late."],
    ["Write a haiku about autumn leaves.", ""],
]


@dataclass
class AppConfig(InferenceModel):
    host: str = key("127.0.0.1", "interface to bind (0.0.0.0 exposes the page to the network)")
    port: int = key(7860, "port")
    share: bool = key(False, "also publish a temporary public gradio.live link")
    auth_env: Optional[str] = key(None, "name of an environment variable holding user:password for basic auth")


def respond(loaded: LoadedModel, instruction: str, input_text: str, mode: str, temperature: float, top_p: float,
            top_k: int, num_beams: int, max_new_tokens: int, cancel: threading.Event):
    """Yields (response so far, exact prompt). Only the chosen mode's settings reach the model."""
    if not instruction.strip():
        yield "", ""
        return
    settings = {"sample": {"temperature": temperature, "top_p": top_p, "top_k": int(top_k) or None},
                "beam": {"num_beams": int(num_beams)}}.get(mode, {})
    decoding = Decoding(decoding=mode, max_new_tokens=int(max_new_tokens), **settings)
    decoding.validate()
    prompt = loaded.prompt(instruction.strip(), input_text.strip())
    cancel.clear()
    text = ""
    yield text, prompt
    for piece in Generation(loaded, prompt, decoding, cancel=cancel):
        text += piece
        yield text, prompt


def build_page(loaded: LoadedModel):
    import gradio as gr

    with gr.Blocks(title="alpaca-lora") as page:
        gr.Markdown(f"## alpaca-lora\n{loaded.description}")
        cancel = gr.State(threading.Event)
        with gr.Row():
            with gr.Column():
                instruction = gr.Textbox(label="Instruction", lines=3, elem_id="instruction")
                input_text = gr.Textbox(label="Input (optional)", lines=3, elem_id="input")
                mode = gr.Radio(["greedy", "sample", "beam"], value="greedy", label="Decoding", elem_id="decoding")
                temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (sample)",
                                        interactive=False)
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top p (sample)", interactive=False)
                top_k = gr.Slider(0, 200, value=40, step=1, label="Top k (sample; 0: off)", interactive=False)
                num_beams = gr.Slider(2, 8, value=4, step=1, label="Beams (beam)", interactive=False)
                max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column():
                output = gr.Textbox(label="Response", lines=14, elem_id="response")
                with gr.Accordion("Prompt sent to the model", open=False):
                    prompt = gr.Textbox(show_label=False, lines=8, elem_id="prompt")
        gr.Examples(EXAMPLES, [instruction, input_text])

        mode.change(lambda m: [gr.update(interactive=m == "sample")] * 3 + [gr.update(interactive=m == "beam")],
                    mode, [temperature, top_p, top_k, num_beams])
        event = generate.click(lambda *args: (yield from respond(loaded, *args)),
                               [instruction, input_text, mode, temperature, top_p, top_k, num_beams, max_new_tokens,
                                cancel], [output, prompt])
        stop.click(lambda event_: event_.set(), cancel, None, cancels=[event])
    return page


def run(cfg: AppConfig) -> int:
    auth = None
    if cfg.auth_env:
        user, _, password = os.environ.get(cfg.auth_env, "").partition(":")
        if not user or not password:
            raise ConfigError(f"key 'auth_env': {cfg.auth_env} must hold user:password")
        auth = (user, password)
    page = build_page(load_for_inference(cfg))
    page.queue().launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, auth=auth)
    return 0


def main(argv: list[str] | None = None) -> int:
    usage = "[adapter=DIR] [model=DIR] [port=7860] [key=value ...]"
    return entry_point(argv, lambda: help_text(TOOL, usage, AppConfig),
                       lambda args: load_inference_settings(AppConfig, args, TOOL), run) or 0


if __name__ == "__main__":
    sys.exit(main())
