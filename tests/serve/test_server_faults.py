"""The server's defects found by trying it as a new user would, each reproduced here:
a request that fails must not hang the server, a client that leaves must free its place at once,
many concurrent streams must all finish, limits must hold, and malformed or hostile requests must
get OpenAI-shaped errors. Timeouts below only keep a hang from hanging the test run."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from alpaca_lora.inference.loading import inference_settings
from alpaca_lora.serve.server import ServeConfig

HANG_GUARD = 120.0  # seconds: a plain float, which every client (httpx, openai on httpx or httpx2) takes
ASK = [{"role": "user", "content": "Tell me a long story."}]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, serving):
    yield from serving(inference_settings(ServeConfig, model=str(tiny_model_dir), served_model_name="tiny"))


@pytest.fixture
def narrow(tiny_model_dir, serving):
    """One request generates at a time and none may wait: a place left taken shows at once."""
    yield from serving(inference_settings(ServeConfig, model=str(tiny_model_dir), served_model_name="tiny",
                                          max_batch=1, max_queue=0))


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, serving):
    os.environ["TEST_DEFECTS_KEY"] = "sk-defects"
    yield from serving(inference_settings(ServeConfig, model=str(tiny_model_dir), served_model_name="tiny",
                                          api_key_env="TEST_DEFECTS_KEY"))


@pytest.fixture(scope="module")
def no_bos_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a tokenizer that adds no BOS: an empty prompt is zero tokens."""
    directory = tmp_path_factory.mktemp("no-bos")
    for path in tiny_model_dir.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return directory


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/completions", json={"model": "tiny", **body}, timeout=HANG_GUARD)


def health(url: str) -> dict:
    return httpx.get(url.removesuffix("/v1") + "/health", timeout=HANG_GUARD).json()


def wait_for(condition, what: str, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


def test_a_sampler_failure_neither_hangs_the_server_nor_later_requests(tiny):
    tiny_temperature = complete(tiny, prompt="Hello", temperature=1e-45, max_tokens=8)
    greedy = complete(tiny, prompt="Hello", temperature=0, max_tokens=8)
    assert tiny_temperature.status_code == 200 and greedy.status_code == 200
    assert tiny_temperature.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]  # decoded greedily


@pytest.mark.slow
def test_an_empty_prompt_is_answered_and_the_next_one_too(no_bos_model, serving):
    for url in serving(inference_settings(ServeConfig, model=str(no_bos_model), served_model_name="tiny")):
        for _ in range(2):
            reply = complete(url, prompt="", temperature=0, max_tokens=5)
            assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == 1  # the start token


@pytest.mark.slow
def test_a_client_that_closes_a_stream_frees_its_place_at_once(narrow):
    client = openai.OpenAI(api_key="x", base_url=narrow, max_retries=0, timeout=HANG_GUARD)
    before = health(narrow)["ended"]
    stream = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=400, stream=True)
    for _, _chunk in zip(range(2), stream):
        pass
    stream.close()  # a chat UI's Stop button
    wait_for(lambda: health(narrow)["ended"].get("cancelled", 0) == before.get("cancelled", 0) + 1, "the cancel")
    assert health(narrow)["ended"].get("length", 0) == before.get("length", 0)  # it did not run to the end
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3)  # the one place is free
    assert reply.usage.completion_tokens == 3


@pytest.mark.slow
def test_a_client_that_disconnects_while_waiting_for_a_whole_answer_frees_its_place(narrow):
    body = json.dumps({"model": "tiny", "messages": ASK, "max_tokens": 400}).encode()
    host, port = narrow.removeprefix("http://").removesuffix("/v1").split(":")
    before = health(narrow)["ended"]
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: health(narrow)["generating"] == 1, "the generation to start")
    wait_for(lambda: health(narrow)["ended"].get("cancelled", 0) == before.get("cancelled", 0) + 1, "the cancel")
    assert health(narrow)["ended"].get("length", 0) == before.get("length", 0)


@pytest.mark.slow
def test_64_concurrent_streams_all_finish_and_the_server_still_answers(tiny):
    client = openai.OpenAI(api_key="x", base_url=tiny, max_retries=0, timeout=HANG_GUARD)

    def stream(i: int) -> str:
        chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Count to {i}."}],
                                                max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(64) as pool:
        streams = [pool.submit(stream, i) for i in range(64)]
        models = httpx.get(f"{tiny}/models", timeout=HANG_GUARD)  # while they run
        answers = [s.result() for s in streams]
    assert models.status_code == 200 and len(answers) == 64
    assert complete(tiny, prompt="Hello", max_tokens=2).status_code == 200


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "Repeat after me: " + "words and more words " * 300}]},
    {"messages": ASK, "max_tokens": 2**63},
    {"messages": ASK, "max_tokens": 500},
])
def test_requests_past_the_context_get_400_context_length_exceeded(tiny, body):
    reply = httpx.post(f"{tiny}/chat/completions", json={"model": "tiny", **body}, timeout=HANG_GUARD)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages" and "512" in error["message"]


def test_the_request_body_is_capped(tiny):
    reply = httpx.post(f"{tiny}/completions", content=json.dumps({"model": "tiny", "prompt": "x" * 2_000_000}),
                       headers={"Content-Type": "application/json"}, timeout=HANG_GUARD)
    assert reply.status_code == 413 and "bytes" in reply.json()["error"]["message"]


def test_a_lone_surrogate_gets_an_openai_shaped_400(tiny):
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    reply = httpx.post(f"{tiny}/chat/completions", content=body, headers={"Content-Type": "application/json"},
                       timeout=HANG_GUARD)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "messages[0].content" and "surrogate" in reply.json()["error"]["message"]


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_tools_and_response_format_are_refused_not_ignored(tiny, extra, param):
    reply = httpx.post(f"{tiny}/chat/completions", json={"model": "tiny", "messages": ASK, **extra}, timeout=HANG_GUARD)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_the_bearer_scheme_is_case_insensitive(keyed):
    for scheme in ("Bearer", "bearer", "BEARER"):
        reply = httpx.get(f"{keyed}/models", headers={"Authorization": f"{scheme} sk-defects"}, timeout=HANG_GUARD)
        assert reply.status_code == 200
    wrong = httpx.get(f"{keyed}/models", headers={"Authorization": "bearer sk-defectz"}, timeout=HANG_GUARD)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"


def test_a_loopback_server_answers_only_loopback_host_names(tiny):
    port = tiny.removesuffix("/v1").rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert httpx.get(f"{tiny}/models", headers={"Host": host}, timeout=HANG_GUARD).status_code == 200
    rebound = httpx.get(f"{tiny}/models", headers={"Host": f"attacker.example:{port}"}, timeout=HANG_GUARD)
    assert rebound.status_code == 403 and rebound.json()["error"]["type"] == "permission_error"



@pytest.mark.slow
def test_sigterm_stops_the_server_even_after_a_failed_request_and_mid_stream(tiny_model_dir, tmp_path, free_port):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "alpaca_lora.serve", f"model={tiny_model_dir}", f"port={port}",
                               "served_model_name=tiny"], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=(tmp_path / "stderr").open("w"), text=True)
    try:
        assert server.stdout.readline().startswith("serving ")
        url = f"http://127.0.0.1:{port}/v1"
        wait_for(lambda: _answers(url), "the server to listen")
        try:
            complete(url, prompt="Hello", temperature=1e-45, max_tokens=8)
        except httpx.TimeoutException:
            pass
        client = openai.OpenAI(api_key="x", base_url=url, max_retries=0, timeout=HANG_GUARD)
        stream = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=400, stream=True)
        next(iter(stream))
        threading.Thread(target=_drain, args=(stream,), daemon=True).start()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) is not None
    finally:
        server.kill()


def _drain(stream) -> None:
    try:
        list(stream)
    except (openai.APIError, httpx.HTTPError):  # the server went away mid-stream: expected here
        pass


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/models", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_with_requests_in_flight_answers_them_in_openais_shape(tiny_model_dir, tmp_path, free_port, sig):
    """A plain request gets a JSON error, a stream an error event before [DONE], and the server does not wait out
    uvicorn's graceful timeout for them (it would log that it cancelled them)."""
    port = free_port()
    stderr = tmp_path / "stderr"
    server = subprocess.Popen([sys.executable, "-m", "alpaca_lora.serve", f"model={tiny_model_dir}", f"port={port}",
                               "served_model_name=tiny"], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=stderr.open("w"), text=True)
    try:
        assert server.stdout.readline().startswith("serving ")
        url = f"http://127.0.0.1:{port}/v1"
        wait_for(lambda: _answers(url), "the server to listen")
        body = {"model": "tiny", "messages": ASK, "max_tokens": 400, "temperature": 0}
        with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=HANG_GUARD) as http:
            plain = pool.submit(http.post, f"{url}/chat/completions", json=body)
            with http.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}) as stream:
                lines = stream.iter_lines()
                events = [next(line for line in lines if line.startswith("data:"))]
                wait_for(lambda: health(url)["generating"] == 2, "both requests to generate")
                server.send_signal(sig)
                events += [line for line in lines if line.startswith("data:")]
            answer = plain.result()
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "server_error"
        assert "shutting down" in answer.json()["error"]["message"]
        assert events[-1] == "data: [DONE]" and "shutting down" in json.loads(events[-2][5:])["error"]["message"]
        server.wait(timeout=60)
        log = stderr.read_text()
        assert "graceful shutdown exceeded" not in log and "Traceback" not in log
    finally:
        server.kill()
