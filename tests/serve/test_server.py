"""The OpenAI-compatible server, through the official openai client: answers, streaming, usage,
stop sequences, n, concurrent clients sharing the engine, the queue limit, log probabilities,
malformed requests, the API key, and our own data builder."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from alpaca_lora.inference.loading import inference_settings, load_for_inference
from alpaca_lora.serve.server import ServeConfig


@pytest.fixture
def question(fact) -> list[dict]:
    """The fact's question as a chat request's messages."""
    return [{"role": "user", "content": fact["instruction"]}]


@pytest.fixture(scope="module")
def server(fact_adapters, serving):
    """The fact adapter, behind an API key."""
    import os

    os.environ["TEST_SERVE_KEY"] = "sk-local-test"
    yield from serving(inference_settings(ServeConfig, adapter=str(fact_adapters[16]), served_model_name="zorblax",
                                          api_key_env="TEST_SERVE_KEY"))


@pytest.fixture(scope="module")
def rambling(tiny_model_dir, serving):
    """The untrained tiny model: it rambles until max_tokens, so streaming and 'length' are visible."""
    yield from serving(inference_settings(ServeConfig, model=str(tiny_model_dir), served_model_name="tiny"))


@pytest.fixture
def client(server):
    return openai.OpenAI(api_key="sk-local-test", base_url=server, max_retries=0)


def test_models_and_a_chat_answer_with_usage(client, question):
    assert [m.id for m in client.models.list().data] == ["zorblax"]
    reply = client.chat.completions.create(model="zorblax", messages=question, temperature=0, max_tokens=20)
    assert reply.choices[0].message.content == "Quibbletown." and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.parametrize("model", ["zorblax", "tiny"])
def test_streaming_gives_the_same_text_in_pieces(server, rambling, model, question):
    client = openai.OpenAI(api_key="sk-local-test", base_url=server if model == "zorblax" else rambling)
    ask = dict(model=model, messages=question, temperature=0, max_tokens=40)
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


def test_completions_continue_a_raw_prompt_and_honour_stop(client, fact):
    from alpaca_lora.data.templates import get_template

    prompt = get_template("alpaca").format(fact["instruction"])
    reply = client.completions.create(model="zorblax", prompt=prompt, temperature=0, max_tokens=20)
    assert reply.choices[0].text.strip() == "Quibbletown."
    cut = client.completions.create(model="zorblax", prompt=prompt, temperature=0, max_tokens=20, stop=["town"])
    assert cut.choices[0].text.strip() == "Quibble" and cut.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="zorblax", prompt=prompt, temperature=0, max_tokens=20, stop="town",
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream).strip() == "Quibble"


@pytest.mark.slow
def test_n_choices_with_sampling(client):
    reply = client.chat.completions.create(model="zorblax", messages=[{"role": "user", "content": "Say anything."}],
                                           temperature=1.5, n=3, max_tokens=8)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1 and reply.usage.completion_tokens > 3


@pytest.mark.slow
def test_n_choices_stream_side_by_side(rambling):
    client = openai.OpenAI(api_key="x", base_url=rambling, max_retries=0)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Say anything."}], max_tokens=12)
    texts = {0: "", 1: "", 2: ""}
    for chunk in client.chat.completions.create(**ask, n=3, temperature=1.5, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert len(set(texts.values())) > 1
    greedy = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**ask, n=2, temperature=0, stream=True):
        for choice in chunk.choices:
            greedy[choice.index] += choice.delta.content or ""
    assert greedy[0] == greedy[1] == client.chat.completions.create(**ask, temperature=0).choices[0].message.content


def test_system_message_and_earlier_turns_go_into_the_input(client, server, fact, question):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, question[0]]
    reply = client.chat.completions.create(model="zorblax", messages=messages, temperature=0, max_tokens=5)
    with_input = client.completions.create(model="zorblax", temperature=0, max_tokens=5, prompt=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{fact['instruction']}\n\n### Input:\nAnswer briefly.\n\nUser: Hi\n\nAssistant: Hello!\n\n"
        "### Response:"))
    assert reply.usage.prompt_tokens == with_input.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_concurrent_clients_get_what_they_get_one_at_a_time(client, rambling, stream, fact):
    questions = [fact["instruction"], "Say hello.", fact["instruction"], "Name a color.", "Tell me a story.",
                 "Write a haiku about autumn leaves.", "Give three tips for staying healthy.", "Count to five."]
    clients = {"zorblax": client, "tiny": openai.OpenAI(api_key="x", base_url=rambling, max_retries=0)}

    def ask(job):
        model, question = job
        ask = dict(model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16)
        if not stream:
            reply = clients[model].chat.completions.create(**ask)
            return reply.choices[0].message.content, reply.usage.completion_tokens
        chunks = list(clients[model].chat.completions.create(**ask, stream=True,
                                                             stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens

    jobs = [(model, q) for q in questions for model in clients]
    alone = [ask(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone and together[0][0] == together[4][0] == "Quibbletown."


def test_stop_strings_end_only_their_own_request(rambling):
    client = openai.OpenAI(api_key="x", base_url=rambling, max_retries=0)
    ask = dict(model="tiny", prompt="Give three tips for staying healthy.", temperature=0, max_tokens=30)
    whole = client.completions.create(**ask).choices[0].text
    stop = whole[10:13]
    with ThreadPoolExecutor(2) as pool:
        cut, uncut = pool.map(lambda extra: client.completions.create(**ask, **extra).choices[0], [{"stop": stop}, {}])
    assert cut.text == whole[:whole.index(stop)] and cut.finish_reason == "stop"
    assert uncut.text == whole and uncut.finish_reason == "length"


@pytest.mark.slow
def test_a_full_queue_answers_429(tiny_model_dir, serving):
    cfg = inference_settings(ServeConfig, model=str(tiny_model_dir), served_model_name="tiny", max_batch=1,
                             max_queue=1)
    for url in serving(cfg):
        client = openai.OpenAI(api_key="x", base_url=url, max_retries=0)
        ask = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=400)
        streams = [client.chat.completions.create(**ask, stream=True) for _ in range(2)]  # one generates, one waits
        with pytest.raises(openai.RateLimitError) as full:
            client.chat.completions.create(**ask)
        assert full.value.body["type"] == "rate_limit_error" and full.value.body["code"] == "rate_limit_exceeded"
        assert full.value.response.headers["retry-after"] == "1"
        health = httpx.get(url.removesuffix("/v1") + "/health").json()
        assert health["status"] == "ok" and health["generating"] + health["waiting"] == health["places"] == 2
        for stream in streams:
            stream.close()


@pytest.fixture(scope="module")
def fact_model(fact_adapters):
    return load_for_inference(inference_settings(adapter=str(fact_adapters[16])))


def direct_logprobs(loaded, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """Log probabilities of the model, in one forward pass over prompt + completion."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt_ids + completion_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1:-1]


def test_chat_logprobs_are_the_models_own(client, fact_model, fact, question):
    reply = client.chat.completions.create(model="zorblax", messages=question, temperature=0, max_tokens=20,
                                           logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    tokenizer = fact_model.tokenizer
    prompt_ids = fact_model.encode(fact_model.prompt(fact["instruction"]))
    completion_ids = tokenizer(fact["output"], add_special_tokens=False)["input_ids"]
    assert "".join(entry.token for entry in content).strip() == "Quibbletown."
    expected = direct_logprobs(fact_model, prompt_ids, completion_ids)
    assert len(content) == len(completion_ids)
    for entry, row, token_id in zip(content, expected, completion_ids):
        assert entry.token == tokenizer.decode([token_id]) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
        top = row.topk(5)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i in top.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_streamed_and_completion_logprobs_agree_with_chat(client, fact, question):
    ask = dict(model="zorblax", messages=question, temperature=0, max_tokens=20, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**ask).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(**ask, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]
    from alpaca_lora.data.templates import get_template

    legacy = client.completions.create(model="zorblax", prompt=get_template("alpaca").format(fact["instruction"]),
                                       temperature=0, max_tokens=20, logprobs=2).choices[0].logprobs
    assert legacy.tokens == [e.token for e in whole]
    assert legacy.token_logprobs == pytest.approx([e.logprob for e in whole], abs=1e-4)
    assert all(len(top) in (2, 3) and legacy.tokens[i] in top for i, top in enumerate(legacy.top_logprobs))
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:i]) for i in range(len(legacy.tokens))]


HELLO = [{"role": "user", "content": "Hello."}]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "zorblax", "messages": []}, 400, "messages"),
    ({"model": "zorblax"}, 400, "messages"),
    ({"model": "zorblax", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "zorblax", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "zorblax", "messages": HELLO, "temperature": 5}, 400, "temperature"),
    ({"model": "zorblax", "messages": HELLO, "n": 9}, 400, "n"),
    ({"model": "zorblax", "messages": HELLO, "logprobs": True, "top_logprobs": 6}, 400, "top_logprobs"),
    ({"model": "zorblax", "messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "zorblax", "messages": HELLO, "logit_bias": {"50": 10}}, 400, "logit_bias"),
    ({"model": "zorblax", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "gpt-4", "messages": HELLO}, 404, "model"),
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


def test_the_data_builder_can_use_the_server(server, tmp_path, monkeypatch, fact):
    from alpaca_lora.data.self_instruct.__main__ import main as build

    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-test")
    source = tmp_path / "data.json"
    source.write_text(json.dumps([{**fact, "output": "I do not know."}]))
    assert build(["mode=regenerate", f"input={source}", "model=zorblax", f"base_url={server}",
                  f"output={tmp_path / 'out.json'}", "temperature=0", "top_p=null", "max_tokens=20"]) == 0
    assert json.loads((tmp_path / "out.json").read_text()) == [fact]


@pytest.mark.parametrize("logprobs, top", [(None, None), (0, 1), (2, 3)])
def test_completion_logprobs_are_a_count_of_alternatives_or_null(client, logprobs, top):
    reply = client.completions.create(model="zorblax", prompt="Hello", temperature=0, max_tokens=4, logprobs=logprobs)
    listed = reply.choices[0].logprobs
    assert (listed is None) == (top is None)
    if listed is not None:  # the sampled token's, plus `logprobs` alternatives (one more if it is not among them)
        assert len(listed.tokens) == 4 and all(1 <= len(t) <= top for t in listed.top_logprobs)


@pytest.mark.parametrize("value", [False, True])
def test_completion_logprobs_true_or_false_is_refused_not_taken_as_a_count(client, value):
    """OpenAI's completions take an integer or null (true/false is the chat API's form): false is not 0."""
    with pytest.raises(openai.BadRequestError) as error:
        client.post("/completions", body={"model": "zorblax", "prompt": "Hello", "max_tokens": 2, "logprobs": value},
                    cast_to=object)
    assert error.value.body["param"] == "logprobs" and "integer" in error.value.body["message"]


def test_a_seed_reproduces_a_sampled_answer_also_batched_with_others(client):
    ask = dict(model="zorblax", messages=[{"role": "user", "content": "Say anything."}], temperature=1.5,
               max_tokens=12)
    first = client.chat.completions.create(**ask, seed=7).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda seed: client.chat.completions.create(**ask, seed=seed), [7, 8, 7, 9]))
    texts = [r.choices[0].message.content for r in replies]
    assert texts[0] == texts[2] == first and len(set(texts)) > 1
    choices = [[c.message.content for c in client.chat.completions.create(**ask, seed=7, n=3).choices]
               for _ in range(2)]
    assert choices[0] == choices[1] and choices[0][0] == first and len(set(choices[0])) > 1
