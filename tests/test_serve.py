"""The OpenAI-compatible server, through the official openai client: answers, streaming, usage,
stop sequences, n, concurrent clients, malformed requests, the API key, and our own data builder."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from conftest import FACT

from alpaca_lora.inference import inference_settings, load_for_inference
from alpaca_lora.serve import ServeConfig, create_app

QUESTION = [{"role": "user", "content": FACT["instruction"]}]


def serving(cfg: ServeConfig):
    """Runs the server on a free loopback port in this process; yields its base URL."""
    app = create_app(load_for_inference(cfg), cfg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(fact_adapters):
    """The fact adapter, behind an API key."""
    import os

    os.environ["TEST_SERVE_KEY"] = "sk-local-test"
    yield from serving(inference_settings(ServeConfig, adapter=str(fact_adapters[16]), served_model_name="zorblax",
                                          api_key_env="TEST_SERVE_KEY"))


@pytest.fixture(scope="module")
def rambling(tiny_model_dir):
    """The untrained tiny model: it rambles until max_tokens, so streaming and 'length' are visible."""
    yield from serving(inference_settings(ServeConfig, model=str(tiny_model_dir), served_model_name="tiny"))


@pytest.fixture
def client(server):
    return openai.OpenAI(api_key="sk-local-test", base_url=server, max_retries=0)


def test_models_and_a_chat_answer_with_usage(client):
    assert [m.id for m in client.models.list().data] == ["zorblax"]
    reply = client.chat.completions.create(model="zorblax", messages=QUESTION, temperature=0, max_tokens=20)
    assert reply.choices[0].message.content == "Quibbletown." and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.parametrize("model", ["zorblax", "tiny"])
def test_streaming_gives_the_same_text_in_pieces(server, rambling, model):
    client = openai.OpenAI(api_key="sk-local-test", base_url=server if model == "zorblax" else rambling)
    ask = dict(model=model, messages=QUESTION, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage
    if model == "tiny":  # a long answer arrives as it is generated, and is cut at max_tokens
        assert len(pieces) >= 3 and whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == 40
    else:
        assert whole.choices[0].message.content == "Quibbletown." and whole.choices[0].finish_reason == "stop"


def test_completions_continue_a_raw_prompt_and_honour_stop(client):
    from alpaca_lora.data.templates import get_template

    prompt = get_template("alpaca").format(FACT["instruction"])
    reply = client.completions.create(model="zorblax", prompt=prompt, temperature=0, max_tokens=20)
    assert reply.choices[0].text.strip() == "Quibbletown."
    cut = client.completions.create(model="zorblax", prompt=prompt, temperature=0, max_tokens=20, stop=["town"])
    assert cut.choices[0].text.strip() == "Quibble" and cut.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="zorblax", prompt=prompt, temperature=0, max_tokens=20, stop="town",
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream).strip() == "Quibble"


def test_n_choices_with_sampling(client):
    reply = client.chat.completions.create(model="zorblax", messages=[{"role": "user", "content": "Say anything."}],
                                           temperature=1.5, n=3, max_tokens=8)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1 and reply.usage.completion_tokens > 3


def test_system_message_and_earlier_turns_go_into_the_input(client, server):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, QUESTION[0]]
    reply = client.chat.completions.create(model="zorblax", messages=messages, temperature=0, max_tokens=5)
    with_input = client.completions.create(model="zorblax", temperature=0, max_tokens=5, prompt=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{FACT['instruction']}\n\n### Input:\nAnswer briefly.\n\nUser: Hi\n\nAssistant: Hello!\n\n"
        "### Response:"))
    assert reply.usage.prompt_tokens == with_input.usage.prompt_tokens


def test_concurrent_clients_each_get_their_own_answer(client):
    questions = [FACT["instruction"], "Say hello.", FACT["instruction"], "Name a color."]

    def ask(question):
        reply = client.chat.completions.create(model="zorblax", messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=10)
        return reply.choices[0].message.content

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone and together[0] == together[2] == "Quibbletown."


@pytest.mark.parametrize("body, status, param", [
    ({"model": "zorblax", "messages": []}, 400, "messages"),
    ({"model": "zorblax"}, 400, "messages"),
    ({"model": "zorblax", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "zorblax", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "zorblax", "messages": QUESTION, "temperature": 5}, 400, "temperature"),
    ({"model": "zorblax", "messages": QUESTION, "n": 2, "stream": True}, 400, "n"),
    ({"model": "zorblax", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "gpt-4", "messages": QUESTION}, 404, "model"),
])
def test_malformed_requests_get_openai_shaped_errors(client, body, status, param):
    with pytest.raises(openai.APIStatusError) as error:
        client.post("/chat/completions", body=body, cast_to=object)
    assert error.value.status_code == status
    assert error.value.body["param"] == param and error.value.body["message"]


def test_bad_json_and_missing_key(server):
    bad = httpx.post(f"{server}/chat/completions", content=b"{not json", headers={
        "Authorization": "Bearer sk-local-test", "Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    anonymous = openai.OpenAI(api_key="wrong", base_url=server, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_the_data_builder_can_use_the_server(server, tmp_path, monkeypatch):
    from alpaca_lora.data.self_instruct.__main__ import main as build

    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-test")
    source = tmp_path / "data.json"
    source.write_text(json.dumps([{**FACT, "output": "I do not know."}]))
    assert build(["mode=regenerate", f"input={source}", "model=zorblax", f"base_url={server}",
                  f"output={tmp_path / 'out.json'}", "temperature=0", "top_p=null", "max_tokens=20"]) == 0
    assert json.loads((tmp_path / "out.json").read_text()) == [FACT]
