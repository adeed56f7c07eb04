"""The app's chat view, for a model trained on conversations (or with the base model's own chat template): a
conversation with its history, each turn prompted exactly as the model was trained (``LoadedModel.chat_prompt``,
the one renderer the server and training use), streamed, stoppable, the exact prompt shown.

A model trained on single instructions gets no chat view: it never saw earlier turns as turns, so the page
offers what it learned (the instruction view). Votes are cast in the instruction view; a chat's turns are not
stored.
"""

from __future__ import annotations

from contextlib import aclosing

from alpaca_lora.app.decoding import page_decoding, shown, stream
from alpaca_lora.app.voting import Refused, Voting
from alpaca_lora.data.templates import ConversationError, ModelTemplate
from alpaca_lora.inference.engine import EngineError, QueueFull
from alpaca_lora.inference.loading import LoadedModel

CHAT_MODES = ("greedy", "sample")


def offers_chat(loaded: LoadedModel) -> bool:
    """Whether the model knows turns: trained on conversations, or prompted with the base model's chat template."""
    return loaded.multi_turn or isinstance(loaded.template, ModelTemplate)


def text_of(content) -> str:
    """A chat message's text: Gradio keeps a message's content as a string or as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    return "".join(text_of(part) for part in content or [])


def as_messages(history: list) -> list[dict]:
    """The chatbot's history as role/content messages with text content (what ``chat_prompt`` reads)."""
    return [{"role": m["role"], "content": text_of(m["content"])} for m in history or []
            if m.get("role") in ("user", "assistant", "system")]


class Chat:
    """The chat view's handler: one turn answered with the history before it."""

    def __init__(self, loaded: LoadedModel, voting: Voting):
        self.loaded, self.voting = loaded, voting

    async def turn(self, message: str, history: list, mode: str, temperature: float, top_p: float,
                   max_new_tokens: int, visit: dict):
        """Yields (history with the user's turn and the answer so far, the message box emptied, the exact prompt)."""
        try:
            self.voting.check(visit)
        except Refused as exc:
            raise shown(exc) from None
        messages = as_messages(history)
        if not message.strip():
            yield messages, "", ""
            return
        messages.append({"role": "user", "content": message.strip()})
        try:
            prompt = self.loaded.chat_prompt(messages)
        except ConversationError as exc:
            raise shown(exc) from None
        decoding = page_decoding(mode, temperature, top_p, 0, 1, max_new_tokens)
        try:
            async with aclosing(stream(self.loaded, prompt, decoding)) as texts:
                async for text, _ in texts:
                    yield [*messages, {"role": "assistant", "content": text}], "", prompt
        except (QueueFull, EngineError) as exc:  # a history the context cannot hold fails alone, in one line
            raise shown(exc) from None


def chat_section(chat: Chat, visit, max_batch: int):
    """The conversation, the message box, send, stop and clear, the decoding used, the prompt sent; returns the
    send event (the page's Stop cancels it)."""
    import gradio as gr

    chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot")
    with gr.Row():
        message = gr.Textbox(show_label=False, placeholder="Message (Enter sends)", scale=5, elem_id="chat-message")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        stop = gr.Button("Stop", elem_id="chat-stop")
        clear = gr.Button("New conversation", elem_id="chat-clear")
    with gr.Accordion("Decoding", open=False):
        mode = gr.Radio(list(CHAT_MODES), value="greedy", label="Decoding", elem_id="chat-decoding")
        temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (sample)", interactive=False)
        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top p (sample)", interactive=False)
        max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
    with gr.Accordion("Prompt sent to the model (the whole conversation)", open=False):
        prompt = gr.Textbox(show_label=False, lines=10, elem_id="chat-prompt")
    mode.change(lambda m: [gr.update(interactive=m == "sample")] * 2, mode, [temperature, top_p])
    inputs = [message, chatbot, mode, temperature, top_p, max_new_tokens, visit]
    sent = [send.click(chat.turn, inputs, [chatbot, message, prompt], api_name="chat", concurrency_limit=max_batch),
            message.submit(chat.turn, inputs, [chatbot, message, prompt], api_visibility="private",
                           concurrency_limit=max_batch)]
    stop.click(None, None, None, cancels=sent)
    clear.click(lambda: ([], "", ""), None, [chatbot, message, prompt], api_visibility="private")
    return sent
