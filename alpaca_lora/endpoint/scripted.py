"""A small OpenAI-compatible HTTP server on loopback, for offline tests and benchmarks of anything
that talks to an endpoint (the data builder, the judge): replies and faults are scripted per HTTP
request (retries included), and everything it received is recorded."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Canned:
    """An answer the scripted endpoint gives (after ``delay`` seconds)."""

    text: str
    finish_reason: str = "stop"
    delay: float = 0.0


@dataclass
class Fault:
    """``status`` (with optional Retry-After), ``stall`` seconds before replying, ``drop`` the connection,
    or ``body``: a 200 whose body is not an OpenAI response."""

    status: int = 0
    retry_after: str | None = None
    stall: float = 0.0
    drop: bool = False
    body: str | None = None


class _Handler(BaseHTTPRequestHandler):
    """One HTTP request to the scripted server (``scripted``, set on a subclass per server)."""

    protocol_version = "HTTP/1.1"
    scripted: ScriptedOpenAI

    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.scripted
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server._lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            server.received.append({"path": self.path, "body": body, "headers": headers, "time": time.monotonic()})
            action = server.script.pop(0) if server.script else None
        if action is None:
            action = server.default(body)
        if isinstance(action, Fault):
            return self._fault(action)
        time.sleep(action.delay)
        self._answer(body, action)

    def _fault(self, fault: Fault):
        if fault.drop:
            self.close_connection = True
            return
        if fault.stall:
            time.sleep(fault.stall)
        if fault.body is not None:
            return self._send(200, fault.body.encode())
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        error = {"error": {"message": f"scripted {fault.status}", "type": "test", "code": None}}
        self._send(fault.status or 500, json.dumps(error).encode(), headers)

    def _answer(self, body: dict, reply: Canned):
        server = self.scripted
        prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        usage = {"prompt_tokens": server.count_tokens(prompt), "completion_tokens": server.count_tokens(reply.text)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with server._lock:
            for name in ("prompt_tokens", "completion_tokens"):
                server.usage[name] += usage[name]
        if "messages" in body:
            choice = {"index": 0, "message": {"role": "assistant", "content": reply.text},
                      "finish_reason": reply.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": reply.text, "finish_reason": reply.finish_reason, "logprobs": None}
            obj = "text_completion"
        response = {"id": "x", "object": obj, "created": 0, "model": body["model"], "choices": [choice],
                    "usage": usage}
        self._send(200, json.dumps(response).encode())

    def _send(self, status: int, payload: bytes, headers: dict | None = None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a stalled reply past its timeout)


class ScriptedOpenAI:
    def __init__(self, default: Callable[[dict], Canned] | None = None, script: list | None = None,
                 count_tokens: Callable[[str], int] = lambda text: len(text.split())):
        self.default = default or (lambda body: Canned("ok"))
        self.count_tokens = count_tokens
        self.script = list(script or [])
        self.received: list[dict] = []  # {"path", "body", "headers", "time"}
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}  # of the replies actually sent
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"scripted": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


SYLLABLES = ("ka", "lo", "mi", "ru", "ze", "ta", "vo", "ni", "sa", "pe", "du", "fi", "go", "he", "ju", "ly")


def nonsense_instruction(rng: random.Random, words: int = 7) -> str:
    """An instruction of made-up words: passes every filter and is never a near-duplicate of another."""
    made = ["".join(rng.choice(SYLLABLES) for _ in range(3)) for _ in range(words)]
    return made[0].capitalize() + " " + " ".join(made[1:]) + "."


def numbered_reply(tasks: list[dict], first_number: int, restate_first: bool = False) -> str:
    """Tasks in Stanford's numbered format, continuing a prompt that opened ``N. Instruction:``."""
    parts = []
    for number, task in enumerate(tasks, start=first_number):
        head = f"{number}. Instruction: " if (number > first_number or restate_first) else " "
        parts.append(f"{head}{task['instruction']}\n{number}. Input:\n{task['input'] or '<noinput>'}\n"
                     f"{number}. Output:\n{task['output']}\n")
    return "###\n".join(parts) + "###"


def task_replies(seed: int = 0, tasks_per_reply: int = 17, delay: float = 0.0) -> Callable[[dict], Canned]:
    """A default reply: ``tasks_per_reply`` new, distinct, valid tasks per request."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def reply(body: dict) -> Canned:
        with lock:
            tasks = [{"instruction": nonsense_instruction(rng), "input": "" if i % 2 else "some input",
                      "output": f"answer {rng.random():.6f}"} for i in range(tasks_per_reply)]
        return Canned(numbered_reply(tasks, 4), delay=delay)

    return reply
