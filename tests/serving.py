"""Running the OpenAI-compatible server inside a test: on a free loopback port, in a thread."""

import threading
import time

import uvicorn

from alpaca_lora.inference import load_for_inference
from alpaca_lora.serve import ServeConfig, create_app


def serving(cfg: ServeConfig):
    """Runs the server for ``cfg``; yields its base URL (``.../v1``), then shuts it down."""
    app = create_app(load_for_inference(cfg), cfg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=30)
