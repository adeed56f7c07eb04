"""``/v1/completions`` as OpenAI and vLLM define it, through the official openai client: every prompt form (a string,
strings, token ids, lists of token ids; token ids used exactly as given), one choice per prompt and per n in
OpenAI's order, echo with the prompt's log probabilities (also with max_tokens 0), ignore_eos and min_tokens,
parameters this server does not implement refused by name, and streamed chunks with ``usage: null``."""

import json

import httpx
import openai
import pytest
import torch

from alpaca_lora.data.templates import get_template
from alpaca_lora.inference.loading import inference_settings, load_for_inference
from alpaca_lora.serve.server import ServeConfig


@pytest.fixture(scope="module")
def url(fact_adapters, serving):
    yield from serving(inference_settings(ServeConfig, adapter=str(fact_adapters[16]), served_model_name="zorblax",
                                          max_batch=4))


@pytest.fixture
def client(url):
    return openai.OpenAI(api_key="x", base_url=url, max_retries=0)


@pytest.fixture(scope="module")
def fact_model(fact_adapters):
    return load_for_inference(inference_settings(adapter=str(fact_adapters[16])))


@pytest.fixture
def question(fact) -> str:
    return get_template("alpaca").format(fact["instruction"])


def complete(client, prompt, **extra):
    return client.completions.create(**{"model": "zorblax", "prompt": prompt, "temperature": 0, "max_tokens": 8,
                                        **extra})


def test_every_prompt_form_gives_one_choice_per_prompt_in_order(client, fact_model, question):
    others = ["Name a color.", "Say hello."]
    alone = [complete(client, p).choices[0].text for p in [question, *others]]
    assert alone[0].strip() == "Quibbletown."
    listed = complete(client, [question, *others])
    assert [c.index for c in listed.choices] == [0, 1, 2] and [c.text for c in listed.choices] == alone
    ids = [fact_model.encode(p) for p in [question, *others]]
    as_ids = complete(client, ids)
    assert [c.text for c in as_ids.choices] == alone
    assert as_ids.usage.prompt_tokens == listed.usage.prompt_tokens == sum(len(i) for i in ids)
    assert complete(client, ids[0]).choices[0].text == alone[0]  # one list of token ids is one prompt


def test_token_ids_are_used_exactly_as_given(client, fact_model, question):
    """No start token is added to token ids (a string prompt is encoded as training encodes it, with it)."""
    ids = fact_model.encode(question)
    assert ids[0] == fact_model.tokenizer.bos_token_id
    reply = complete(client, ids[1:], max_tokens=2, echo=True, logprobs=0)
    assert reply.usage.prompt_tokens == len(ids) - 1
    assert reply.choices[0].logprobs.tokens[:len(ids) - 1] == [fact_model.tokenizer.decode([t]) for t in ids[1:]]


def test_n_choices_per_prompt_are_numbered_as_openai_numbers_them(client, question):
    reply = client.completions.create(model="zorblax", prompt=[question, "Name a color."], temperature=1.2,
                                      max_tokens=6, n=2, seed=3)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]  # prompt 0's two choices, then prompt 1's
    again = client.completions.create(model="zorblax", prompt="Name a color.", temperature=1.2, max_tokens=6, n=2,
                                      seed=3)
    assert [c.text for c in reply.choices[2:]] == [c.text for c in again.choices]


def direct_logprobs(loaded, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("max_tokens", [0, 1, 3])
def test_echo_gives_the_prompts_tokens_and_their_logprobs(client, fact_model, question, max_tokens):
    ids = fact_model.encode(question)
    reply = complete(client, question, max_tokens=max_tokens, echo=True, logprobs=2)
    choice, lp = reply.choices[0], reply.choices[0].logprobs
    assert choice.text.startswith(question) and len(lp.tokens) == len(ids) + max_tokens
    assert reply.usage.completion_tokens == max_tokens and (max_tokens or choice.finish_reason == "length")
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    expected = direct_logprobs(fact_model, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(expected[i - 1].max().item(), abs=1e-4)
    plain = complete(client, question, max_tokens=max_tokens or 1, logprobs=2).choices[0]
    assert choice.text[len(question):] == (plain.text if max_tokens else "")
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs[:max_tokens], abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(ids) - 1] < len(question)
    assert max_tokens == 0 or lp.text_offset[len(ids)] == len(question)  # the completion's text follows the prompt


def test_echo_streamed_starts_with_the_prompt(client, question):
    chunks = list(complete(client, question, max_tokens=4, echo=True, logprobs=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = complete(client, question, max_tokens=4, echo=True, logprobs=0).choices[0]
    assert text == whole.text and text.startswith(question)
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and whole.logprobs.token_logprobs[0] is None
    assert streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-4)


def test_max_tokens_0_needs_echo(client, question):
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, question, max_tokens=0)
    assert error.value.body["param"] == "max_tokens"


def test_ignore_eos_and_min_tokens(client, question):
    """The fact's answer ends at EOS after a few tokens: ignore_eos goes on to max_tokens, min_tokens at least."""
    plain = complete(client, question, max_tokens=20)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 10
    ignored = complete(client, question, max_tokens=20, extra_body={"ignore_eos": True})
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == 20
    assert ignored.choices[0].text.startswith(plain.choices[0].text)
    at_least = complete(client, question, max_tokens=20, extra_body={"min_tokens": 12})
    assert at_least.usage.completion_tokens >= 12
    assert at_least.choices[0].text.startswith(plain.choices[0].text)
    streamed = complete(client, question, max_tokens=20, stream=True, extra_body={"min_tokens": 12})
    assert "".join(c.choices[0].text for c in streamed) == at_least.choices[0].text


@pytest.mark.parametrize("extra, param", [
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ({"top_k": 5}, "top_k"), ({"repetition_penalty": 1.2}, "repetition_penalty"), ({"use_beam_search": True},
                                                                                  "use_beam_search"),
    ({"min_tokens": 30}, "min_tokens"), ({"suffix": "!"}, "suffix"), ({"best_of": 2}, "best_of"),
])
def test_what_is_not_implemented_is_refused_by_name(url, extra, param):
    reply = httpx.post(f"{url}/completions", json={"model": "zorblax", "prompt": "Hi", "max_tokens": 8, **extra},
                       timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [[10**9]]])
def test_a_bad_prompt_is_a_400_naming_it(url, prompt):
    reply = httpx.post(f"{url}/completions", json={"model": "zorblax", "prompt": prompt, "max_tokens": 2}, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"].startswith("prompt")


@pytest.mark.parametrize("path, body", [("completions", {"prompt": ["Hi", "Name a color."]}),
                                        ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})])
def test_streamed_chunks_carry_usage_null_before_the_usage_chunk(url, path, body):
    """As OpenAI sends them with stream_options.include_usage: every chunk has "usage", null but in the last."""
    ask = {"model": "zorblax", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, **body}
    with httpx.stream("POST", f"{url}/{path}", json=ask, timeout=60) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[-1]["usage"]["total_tokens"] > 0 and chunks[-1]["choices"] == []
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    without = {**ask, "stream_options": None}
    with httpx.stream("POST", f"{url}/{path}", json=without, timeout=60) as reply:
        assert all("usage" not in json.loads(line[6:]) for line in reply.iter_lines()
                   if line.startswith("data: {"))
