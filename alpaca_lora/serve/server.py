"""An OpenAI-compatible HTTP API for a fine-tuned model:
``alpaca-lora serve [adapter=DIR] [model=DIR] [port=8000] [api_key_env=NAME]``

``/v1/chat/completions`` renders the conversation as the model was trained (alpaca_lora.data.templates): for a
model trained on conversations, turn by turn; for one trained on single instructions, the last message (from
the user) is the instruction and system messages and earlier turns become the template's input, as a
transcript (``User: ...``, ``Assistant: ...``). ``/v1/completions`` continues a raw prompt as is.

Requests share the model through the generation engine (alpaca_lora.inference.engine): concurrent requests
are generated together, each with its own sampling settings, stop strings and max_tokens; a client
that disconnects frees its place at once; past ``max_batch + max_queue`` requests the server
answers 429. ``logprobs`` (and up to 5 ``top_logprobs``) are the model's own distribution.
Endpoints never block the event loop, so ``/v1/models`` and ``/health`` answer under any load.

The parts, as vLLM's ``entrypoints/openai``: ``config`` (the keys), ``protocol`` (requests, responses, errors),
``serving`` (the logic, without HTTP), ``api`` (the routes and the middleware); this module runs it.
"""

from __future__ import annotations

import sys

from alpaca_lora.common.settings import entry_point, help_text
from alpaca_lora.inference.loading import load_for_inference
from alpaca_lora.serve.api import create_app
from alpaca_lora.serve.config import TOOL, ServeConfig, load_serve_config
from alpaca_lora.serve.protocol import ChatMessage
from alpaca_lora.serve.serving import chat_prompt

__all__ = ["ChatMessage", "ServeConfig", "chat_prompt", "create_app", "load_serve_config", "main", "run"]


SHUTTING_DOWN = "the server is shutting down; this request was not finished (send it again to another server)"


def run(cfg: ServeConfig) -> int:
    import uvicorn

    class Server(uvicorn.Server):
        """On SIGTERM or SIGINT, the requests in flight end at once with an error in OpenAI's shape (a stream: an
        error event, then [DONE]) before uvicorn waits for them: it then has nothing to wait for."""

        async def shutdown(self, sockets=None) -> None:
            loaded.engine().abort(SHUTTING_DOWN)
            await super().shutdown(sockets)

    loaded = load_for_inference(cfg)
    app = create_app(loaded, cfg)
    model_id = cfg.served_model_name or loaded.name
    print(f"serving {loaded.description} as '{model_id}' at http://{cfg.host}:{cfg.port}/v1"
          f"{' (API key required)' if cfg.api_key_env else ''}", flush=True)
    print(f"requests: {loaded.engine().description}", flush=True)
    server = Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:  # SIGINT, raised again once the server has stopped (as uvicorn.run does)
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    usage = "[adapter=DIR] [model=DIR] [port=8000] [key=value ...]"
    return entry_point(argv, lambda: help_text(TOOL, usage, ServeConfig), load_serve_config, run) or 0


if __name__ == "__main__":
    sys.exit(main())
