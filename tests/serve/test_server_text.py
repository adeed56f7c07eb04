"""The server's text and tokens on the demo model (SmolLM2, byte-level BPE: a Japanese character is several
tokens): stop strings of such characters leak nothing, streamed or not; logprobs list exactly the tokens of the
returned content, each with its own bytes."""

import openai
import pytest

from alpaca_lora.inference.loading import inference_settings
from alpaca_lora.serve.server import ServeConfig

TOKYO = "The capital of Japan is Tokyo. In Japanese it is written"  # greedy: " as おや・らら (" on the demo model


@pytest.fixture(scope="module")
def demo(demo_model_dir, serving):
    yield from serving(inference_settings(ServeConfig, model=str(demo_model_dir), device="cpu",
                                          served_model_name="demo", max_batch=4))


@pytest.fixture
def client(demo):
    return openai.OpenAI(api_key="x", base_url=demo, max_retries=0)


@pytest.mark.slow
@pytest.mark.parametrize("stop, expected", [("らら", " as おや・"), ("や・", " as お")])
@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_of_multibyte_characters_leaks_nothing(client, stop, expected, stream):
    ask = dict(model="demo", prompt=TOKYO, temperature=0, max_tokens=12)
    assert client.completions.create(**ask).choices[0].text.startswith(" as おや・らら")  # the stop strings are there
    if stream:
        chunks = list(client.completions.create(**ask, stop=[stop], stream=True))
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**ask, stop=[stop]).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert text == expected and finish == "stop"


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_the_tokens_of_the_content_with_their_own_bytes(client, stream):
    """The answer starts with a newline token (stripped from the content): it is not listed; a token that is
    a piece of a character has that piece's bytes, not U+FFFD's."""
    ask = dict(model="demo", messages=[{"role": "user", "content": 'Write the Japanese word "おや".'}],
               temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    if stream:
        chunks = list(client.chat.completions.create(**ask, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        choice = client.chat.completions.create(**ask).choices[0]
        content, entries = choice.message.content, choice.logprobs.content
    assert "おや" in content and not content.startswith("\n")
    assert b"".join(bytes(e.bytes) for e in entries) == content.encode("utf-8")
    assert all(len(e.top_logprobs) == 2 and all(t.bytes is not None for t in e.top_logprobs) for e in entries)
