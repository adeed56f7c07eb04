"""A Gradio page to try a fine-tuned model: ``alpaca-lora app [adapter=DIR] [model=DIR] [port=7860]``

Instruction and input boxes, decoding controls that take effect (only the ones the chosen mode
uses can be changed), streamed output, a stop button, example prompts, and the exact prompt the
model was sent. Visitors share the model through the generation engine (their requests are batched
together); the ``generate`` endpoint also serves ``gradio_client``. The app takes no files, so
Gradio's upload route is closed. Binds 127.0.0.1; ``share=true`` and basic auth (``auth_env=NAME``,
a variable holding ``user:password``) are opt-in.
"""

from __future__ import annotations

import os
import sys
from contextlib import aclosing
from dataclasses import dataclass
from typing import Optional

from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.common.settings import check, entry_point, help_text, key
from alpaca_lora.inference.engine import EngineSettings, QueueFull
from alpaca_lora.inference.generation import Decoding, Generation
from alpaca_lora.inference.loading import InferenceModel, LoadedModel, load_for_inference, load_inference_settings

TOOL = "app"
EXAMPLES = [
    ["Give three tips for staying healthy.", ""],
    ["Translate the sentence into French.", "Where is the train station?"],
    ["Classify the sentiment of the review as positive, negative or neutral.", "The food was cold and late."],
    ["Write a haiku about autumn leaves.", ""],
]


@dataclass
class AppConfig(EngineSettings, InferenceModel):
    host: str = key("127.0.0.1", "interface to bind (0.0.0.0 exposes the page to the network)")
    port: int = key(7860, "port")
    share: bool = key(False, "also publish a temporary public gradio.live link")
    auth_env: Optional[str] = key(None, "name of an environment variable holding user:password for basic auth")


async def respond(loaded: LoadedModel, instruction: str, input_text: str, mode: str, temperature: float,
                  top_p: float, top_k: int, num_beams: int, max_new_tokens: int):
    """Yields (response so far, exact prompt). Only the chosen mode's settings reach the model. Stop
    (or a visitor who leaves) cancels the task, and with it the generation, at once."""
    if not instruction.strip():
        yield "", ""
        return
    settings = {"sample": {"temperature": temperature, "top_p": top_p, "top_k": int(top_k) or None},
                "beam": {"num_beams": int(num_beams)}}.get(mode, {})
    decoding = Decoding(decoding=mode, max_new_tokens=int(max_new_tokens), **settings)
    decoding.validate()
    prompt = loaded.prompt(instruction.strip(), input_text.strip())
    text = ""
    yield text, prompt
    async with aclosing(Generation(loaded, prompt, decoding).__aiter__()) as pieces:
        async for piece in pieces:
            text += piece
            yield text, prompt


class NoUploads:
    """ASGI middleware: the page takes no files, so Gradio's upload route answers 403 instead of storing them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/upload"):
            return await JSONResponse({"detail": "this app takes no files"}, status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)


def launch_kwargs() -> dict:
    return {"app_kwargs": {"middleware": [Middleware(NoUploads)]}}


def build_page(loaded: LoadedModel, settings: EngineSettings | None = None):
    import gradio as gr

    engine = loaded.engine(settings)

    async def generate(*args):
        try:
            async with aclosing(respond(loaded, *args)) as outputs:
                async for output in outputs:
                    yield output
        except QueueFull as exc:
            raise gr.Error(str(exc)) from None

    with gr.Blocks(title="alpaca-lora") as page:
        gr.Markdown(f"## alpaca-lora\n{loaded.description}")
        with gr.Row():
            with gr.Column():
                instruction = gr.Textbox(label="Instruction", lines=3, elem_id="instruction")
                input_text = gr.Textbox(label="Input (optional)", lines=3, elem_id="input")
                mode = gr.Radio(["greedy", "sample", "beam"], value="greedy", label="Decoding", elem_id="decoding")
                temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (sample)",
                                        interactive=False)
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top p (sample)", interactive=False)
                top_k = gr.Slider(0, 200, value=0, step=1, label="Top k (sample; 0: off)", interactive=False)
                num_beams = gr.Slider(2, 8, value=4, step=1, label="Beams (beam)", interactive=False)
                max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column():
                output = gr.Textbox(label="Response", lines=14, elem_id="response")
                with gr.Accordion("Prompt sent to the model", open=False):
                    prompt = gr.Textbox(show_label=False, lines=8, elem_id="prompt")
        gr.Examples(EXAMPLES, [instruction, input_text])

        mode.change(lambda m: [gr.update(interactive=m == "sample")] * 3 + [gr.update(interactive=m == "beam")],
                    mode, [temperature, top_p, top_k, num_beams])
        event = generate_button.click(generate, [instruction, input_text, mode, temperature, top_p, top_k, num_beams,
                                                 max_new_tokens], [output, prompt], api_name="generate",
                                      concurrency_limit=engine.settings.max_batch)
        stop.click(None, None, None, cancels=[event])
    return page


def load_app_config(argv: list[str]) -> AppConfig:
    cfg = load_inference_settings(AppConfig, argv, TOOL)
    check(cfg.engine_checks())
    return cfg


def run(cfg: AppConfig) -> int:
    auth = None
    if cfg.auth_env:
        user, _, password = os.environ.get(cfg.auth_env, "").partition(":")
        if not user or not password:
            raise ConfigError(f"key 'auth_env': {cfg.auth_env} must hold user:password")
        auth = (user, password)
    page = build_page(load_for_inference(cfg), cfg)
    page.queue().launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, auth=auth, **launch_kwargs())
    return 0


def main(argv: list[str] | None = None) -> int:
    usage = "[adapter=DIR] [model=DIR] [port=7860] [key=value ...]"
    return entry_point(argv, lambda: help_text(TOOL, usage, AppConfig), load_app_config, run) or 0


if __name__ == "__main__":
    sys.exit(main())
