"""A model trained on conversations, served: the history of a chat is rendered in turns, as it was trained, so a
second answer that depends on the first turn comes back through the real openai client."""

from __future__ import annotations

import openai
import pytest
import yaml

from alpaca_lora.inference.loading import inference_settings
from alpaca_lora.serve.server import ServeConfig


@pytest.fixture(scope="module")
def chat_server(conversation_adapter, serving):
    yield from serving(inference_settings(ServeConfig, adapter=str(conversation_adapter), served_model_name="chat"))


@pytest.fixture
def client(chat_server):
    return openai.OpenAI(api_key="none", base_url=chat_server, max_retries=0)


@pytest.mark.slow
def test_a_two_turn_fact_is_recalled_with_the_models_own_first_answer_in_the_history(client, two_turn_facts,
                                                                                      conversation_adapter):
    from alpaca_lora.data.templates import Prompter, get_template
    from alpaca_lora.model import load_tokenizer

    saved = yaml.safe_load((conversation_adapter / "training_config.yaml").read_text())["config"]
    assert saved["multi_turn"] is True and saved["template"] == "alpaca"  # decided by the data, saved for serving
    prompter = Prompter(get_template("alpaca"), load_tokenizer(str(conversation_adapter)), multi_turn=True)
    for question, answer, follow_up, second in two_turn_facts:
        first = client.chat.completions.create(model="chat", messages=[question], temperature=0, max_tokens=12)
        assert first.choices[0].message.content == answer["content"]
        history = [question, {"role": "assistant", "content": first.choices[0].message.content}, follow_up]
        reply = client.chat.completions.create(model="chat", messages=history, temperature=0, max_tokens=12)
        assert reply.choices[0].message.content == second["content"]  # the same question, its own conversation's answer
        assert reply.choices[0].finish_reason == "stop"  # ended on the EOS learned after the second answer
        assert reply.usage.prompt_tokens == len(prompter.encode(prompter.prompt(history)))  # the prompt trained on


@pytest.mark.slow
def test_a_chat_the_turns_cannot_render_is_a_400_naming_the_message(client):
    with pytest.raises(openai.BadRequestError) as exc_info:
        client.chat.completions.create(model="chat", max_tokens=4, messages=[
            {"role": "user", "content": "Name a planet."}, {"role": "user", "content": "What is its capital?"}])
    error = exc_info.value.body
    assert error["param"] == "messages[1].role" and "two user turns in a row" in error["message"]
    with pytest.raises(openai.BadRequestError) as exc_info:
        client.chat.completions.create(model="chat", max_tokens=4, messages=[
            {"role": "user", "content": "Name a planet."}, {"role": "assistant", "content": "Zorblax."}])
    assert exc_info.value.body["param"] == "messages[1].role"
    assert "the last message must have role 'user'" in exc_info.value.body["message"]
