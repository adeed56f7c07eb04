"""The app's chat view: a model trained on conversations answers with its history, through the page's
``/chat`` endpoint as ``gradio_client`` calls it, prompted exactly as it was trained; a model trained on single
instructions gets no chat view."""

from __future__ import annotations

import pytest

from alpaca_lora.app.chat import as_messages, text_of
from alpaca_lora.app.page import build_page, launch_kwargs
from alpaca_lora.inference.loading import inference_settings, load_for_inference


def launched(adapter, free_port):
    loaded = load_for_inference(inference_settings(adapter=str(adapter)))
    page = build_page(loaded)
    port = free_port()
    page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **launch_kwargs())
    return page, loaded, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def chat_app(conversation_adapter, free_port):
    page, loaded, url = launched(conversation_adapter, free_port)
    yield loaded, url
    page.close()


def test_a_two_turn_fact_is_recalled_in_the_chat_view(chat_app, two_turn_facts):
    from gradio_client import Client

    loaded, url = chat_app
    client = Client(url, verbose=False)
    for question, answer, follow_up, second in two_turn_facts:
        history, box, prompt = client.predict(question["content"], [], "greedy", 0.7, 0.9, 12, api_name="/chat")
        assert box == "" and [text_of(m["content"]) for m in history] == [question["content"], answer["content"]]
        history, _, prompt = client.predict(follow_up["content"], history, "greedy", 0.7, 0.9, 12, api_name="/chat")
        messages = as_messages(history)
        assert messages[-1] == {"role": "assistant", "content": second["content"]}  # depends on the first turn
        assert prompt == loaded.chat_prompt(messages[:-1])  # the prompt trained on, history in turns


def test_the_docs_chat_snippet_carries_the_history(chat_app):
    """docs/app.md's /chat snippet, run as written: the second call's prompt holds the first turn as a turn."""
    import re
    from pathlib import Path

    loaded, url = chat_app
    docs = (Path(__file__).resolve().parents[2] / "docs" / "app.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", docs, re.S) if 'api_name="/chat"' in block]
    scope: dict = {}
    exec(compile(code.replace("http://127.0.0.1:7860/", url), "docs/app.md", "exec"), scope)
    messages = as_messages(scope["history"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert scope["prompt"] == loaded.chat_prompt(messages[:3])


def test_a_history_the_turns_cannot_render_is_one_line(chat_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    history = [{"role": "user", "content": [{"type": "text", "text": "Name a planet."}]}]  # Gradio's message form
    with pytest.raises(AppError, match="two user turns in a row"):
        Client(chat_app[1], verbose=False).predict("What is its capital?", history, "greedy", 0.7, 0.9, 8,
                                                   api_name="/chat")


def test_a_single_turn_model_gets_no_chat_view(fact_adapters, free_port):
    from gradio_client import Client

    page, _, url = launched(fact_adapters[16], free_port)
    try:
        names = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert "/generate" in names and "/chat" not in names
    finally:
        page.close()
