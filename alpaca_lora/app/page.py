"""A Gradio page to try a fine-tuned model: ``alpaca-lora app [adapter=DIR] [model=DIR] [port=7860]``

Instruction and input boxes, decoding controls that take effect (only the ones the chosen mode
uses can be changed), streamed output, a stop button, example prompts, and the exact prompt the
model was sent. Visitors share the model through the generation engine (their requests are batched
together); the ``generate`` endpoint also serves ``gradio_client``. The app takes no files, so
Gradio's upload route is closed. Binds 127.0.0.1; ``share=true`` and basic auth (``auth_env=NAME``,
a variable holding ``user:password``) are opt-in.

Feedback, opt-in: with ``feedback_db=FILE`` each answer can be rated up or down, a second answer to the
same prompt asked for and the better of the two picked; each vote is stored with the answer as the
model made it (``alpaca_lora.feedback.store``) and becomes training data through ``alpaca-lora feedback
export``. With ``terms=FILE`` the page shows that text and can be used (generate and vote, in the browser
and through the API) only once the visitor accepts it; the acceptance is stored with the votes.
"""

from __future__ import annotations

import os
import secrets
from contextlib import aclosing, nullcontext
from dataclasses import dataclass
from typing import Optional

from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from alpaca_lora.app.chat import Chat, chat_section, offers_chat
from alpaca_lora.app.decoding import decoding_record, page_decoding, shown, stream
from alpaca_lora.app.voting import Refused, Terms, Voting, model_identity
from alpaca_lora.common.auth import basic_auth
from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.settings import check, key
from alpaca_lora.feedback.store import FeedbackStore
from alpaca_lora.inference.engine import EngineError, EngineSettings, QueueFull
from alpaca_lora.inference.generation import Decoding
from alpaca_lora.inference.loading import InferenceModel, LoadedModel, load_for_inference, load_inference_settings

TOOL = "app"
EXAMPLES = [
    ["Give three tips for staying healthy.", ""],
    ["Translate the sentence into French.", "Where is the train station?"],
    ["Classify the sentiment of the review as positive, negative or neutral.", "The food was cold and late."],
    ["Write a haiku about autumn leaves.", ""],
]
COMPARE = (("A", "A is better"), ("B", "B is better"), ("tie", "Tie"), ("bad", "Both are bad"))


@dataclass
class AppConfig(EngineSettings, InferenceModel):
    host: str = key("127.0.0.1", "interface to bind (0.0.0.0 exposes the page to the network)")
    port: int = key(7860, "port")
    share: bool = key(False, "also publish a temporary public gradio.live link")
    auth_env: Optional[str] = key(None, "name of an environment variable holding user:password for basic auth")
    feedback_db: Optional[str] = key(None, "SQLite database keeping the visitors' votes (up/down, A or B better) with "
                                           "the answers voted on; off unless set")
    terms: Optional[str] = key(None, "a text file (e.g. a research-only licence) a visitor must accept before "
                                     "using the page; the acceptance is stored with the votes")


async def respond(loaded: LoadedModel, instruction: str, input_text: str, mode: str, temperature: float,
                  top_p: float, top_k: int, num_beams: int, max_new_tokens: int):
    """Yields (response so far, exact prompt)."""
    if not instruction.strip():
        yield "", ""
        return
    decoding = page_decoding(mode, temperature, top_p, top_k, num_beams, max_new_tokens)
    prompt = loaded.prompt(instruction.strip(), input_text.strip())
    async with aclosing(stream(loaded, prompt, decoding)) as texts:
        async for text, _ in texts:
            yield text, prompt


class NoUploads:
    """ASGI middleware: the page takes no files, so Gradio's upload route answers 403 instead of storing them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/upload"):
            return await JSONResponse({"detail": "this app takes no files"}, status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)


def launch_kwargs() -> dict:
    return {"app_kwargs": {"middleware": [Middleware(NoUploads)]}}


class Handlers:
    """The page's event handlers: generation and votes through ``Voting``, its refusals as Gradio errors."""

    def __init__(self, loaded: LoadedModel, voting: Voting):
        self.loaded, self.voting = loaded, voting

    async def generate(self, instruction: str, input_text: str, mode: str, temperature: float, top_p: float,
                       top_k: int, num_beams: int, max_new_tokens: int, visit: dict):
        """Answer A, streamed: yields (response so far, exact prompt, the visit holding the answer)."""
        self._check(visit)
        instruction, input_text = instruction.strip(), input_text.strip()
        if not instruction:
            yield "", "", visit
            return
        decoding = page_decoding(mode, temperature, top_p, top_k, num_beams, max_new_tokens)
        prompt = self.loaded.prompt(instruction, input_text)
        async for text, visit_now in self._stream("A", visit, instruction, input_text, prompt, decoding):
            yield text, prompt, visit_now

    async def another(self, temperature: float, top_p: float, top_k: int, max_new_tokens: int, visit: dict):
        """Answer B to answer A's prompt, sampled (a second greedy answer would be the first one again)."""
        self._check(visit)
        first = (visit or {}).get("A")
        if not first:
            raise shown(Refused("There is no answer yet: generate one first."))
        decoding = page_decoding("sample", temperature, top_p, top_k, 4, max_new_tokens)
        async for text, visit_now in self._stream("B", visit, first["instruction"], first["input"], first["prompt"],
                                                  decoding):
            yield text, visit_now

    async def _stream(self, which: str, visit: dict, instruction: str, input_text: str, prompt: str,
                      decoding: Decoding):
        answer_id, record = secrets.token_urlsafe(12), decoding_record(decoding)
        try:
            async with aclosing(stream(self.loaded, prompt, decoding)) as texts:
                async for text, finish in texts:
                    yield text, self.voting.answer(visit, which, instruction, input_text, prompt, text,
                                                   self.loaded.template.name, record, finish, answer_id)
        except (QueueFull, EngineError) as exc:  # a prompt the context cannot hold fails alone, in one line
            raise shown(exc) from None

    def accept(self, visit: dict):
        return self.voting.accept(visit)

    def rate(self, answer: str, rating: str, voter: str, visit: dict) -> str:
        """``answer``: A or B; ``rating``: up or down; ``voter``: the name the visitor typed, if any."""
        try:
            return self.voting.rate(visit, answer, rating, voter)
        except Refused as exc:
            raise shown(exc) from None

    def prefer(self, choice: str, voter: str, visit: dict) -> str:
        """``choice``: A or B (is better), tie, or bad (both are bad)."""
        try:
            return self.voting.prefer(visit, choice, voter)
        except Refused as exc:
            raise shown(exc) from None

    def _check(self, visit: dict) -> None:
        try:
            self.voting.check(visit)
        except Refused as exc:
            raise shown(exc) from None


def build_page(loaded: LoadedModel, settings: EngineSettings | None = None, voting: Voting | None = None):
    """The page; ``voting`` (default: none) says whether votes are stored and which terms must be accepted."""
    import gradio as gr

    voting = voting or Voting()
    engine = loaded.engine(settings or EngineSettings())  # started here unless the caller started it
    handlers = Handlers(loaded, voting)
    with gr.Blocks(title="alpaca-lora") as page:
        visit = gr.State(voting.new_visit())
        gr.Markdown(f"## alpaca-lora\n{loaded.description}")
        accept = _terms_section(voting.terms)
        with gr.Column(visible=voting.terms is None) as main:
            chatting = None
            if offers_chat(loaded):  # a model that knows turns: the conversation first, the instruction view beside it
                with gr.Tab("Chat"):
                    chatting = chat_section(Chat(loaded, voting), visit, engine.settings.max_batch)
            with gr.Tab("Instruction") if chatting is not None else nullcontext():
                controls, generate_button, stop, output, prompt, right = _generation_section()
                with right:
                    votes = _feedback_section() if voting.store is not None else None
        mode = controls[2]
        mode.change(lambda m: [gr.update(interactive=m == "sample")] * 3 + [gr.update(interactive=m == "beam")],
                    mode, controls[3:7])
        events = [generate_button.click(handlers.generate, [*controls, visit], [output, prompt, visit],
                                        api_name="generate", concurrency_limit=engine.settings.max_batch)]
        if accept is not None:
            accept.click(handlers.accept, visit, visit, api_name="accept_terms").then(
                lambda: (gr.update(visible=True), gr.update(visible=False)), None, [main, accept],
                api_visibility="private")
        if votes is not None:
            events.append(_wire_votes(handlers, votes, controls, visit, generate_button, engine.settings.max_batch))
        stop.click(None, None, None, cancels=events)
    return page


def _terms_section(terms: Terms | None):
    """The terms and their Accept button (None without terms)."""
    import gradio as gr

    if terms is None:
        return None
    with gr.Accordion(f"Terms of use ({terms.name})", open=True, elem_id="terms"):
        gr.Markdown(terms.text, elem_id="terms-text")
        return gr.Button("I accept these terms", variant="primary", elem_id="accept-terms")


def _generation_section():
    """The instruction, the decoding controls, generate and stop; the response and the prompt sent."""
    import gradio as gr

    with gr.Row():
        with gr.Column():
            instruction = gr.Textbox(label="Instruction", lines=3, elem_id="instruction")
            input_text = gr.Textbox(label="Input (optional)", lines=3, elem_id="input")
            mode = gr.Radio(["greedy", "sample", "beam"], value="greedy", label="Decoding", elem_id="decoding")
            temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (sample)", interactive=False)
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top p (sample)", interactive=False)
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top k (sample; 0: off)", interactive=False)
            num_beams = gr.Slider(2, 8, value=4, step=1, label="Beams (beam)", interactive=False)
            max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", elem_id="stop")
        with gr.Column() as right:
            output = gr.Textbox(label="Response", lines=14, elem_id="response")
            with gr.Accordion("Prompt sent to the model", open=False):
                prompt = gr.Textbox(show_label=False, lines=8, elem_id="prompt")
    gr.Examples(EXAMPLES, [instruction, input_text])
    controls = [instruction, input_text, mode, temperature, top_p, top_k, num_beams, max_new_tokens]
    return controls, generate_button, stop, output, prompt, right


def _feedback_section() -> dict:
    """Rating buttons for answer A, another answer (B) with its own, the comparison, the voter's name."""
    import gradio as gr

    parts = {}
    with gr.Group(elem_id="feedback"):
        with gr.Row():
            parts["A-up"] = gr.Button("👍 Good", elem_id="rate-A-up", size="sm")
            parts["A-down"] = gr.Button("👎 Bad", elem_id="rate-A-down", size="sm")
            parts["another"] = gr.Button("Another answer", elem_id="another", size="sm")
        parts["answer-B"] = gr.Textbox(label="Another answer (B, sampled)", lines=6, elem_id="response-B")
        with gr.Row():
            parts["B-up"] = gr.Button("👍 Good", elem_id="rate-B-up", size="sm")
            parts["B-down"] = gr.Button("👎 Bad", elem_id="rate-B-down", size="sm")
        with gr.Row():
            for choice, label in COMPARE:
                parts[f"prefer-{choice}"] = gr.Button(label, elem_id=f"prefer-{choice}", size="sm")
        parts["voter"] = gr.Textbox(label="Your name (optional; stored with your votes)", elem_id="voter")
        parts["status"] = gr.Markdown(elem_id="feedback-status")
        # What the API passes by name (the buttons above pass them fixed): /rate and /prefer.
        parts["which"] = gr.Textbox(label="answer", visible=False)
        parts["rating"] = gr.Textbox(label="rating", visible=False)
        parts["choice"] = gr.Textbox(label="choice", visible=False)
        parts["rate"] = gr.Button(visible=False)
        parts["prefer"] = gr.Button(visible=False)
    return parts


def _wire_votes(handlers: Handlers, votes: dict, controls: list, visit, generate_button, max_batch: int):
    """Each button to its handler; ``/another_answer``, ``/rate`` and ``/prefer`` named for ``gradio_client``.
    Returns the another-answer event (Stop cancels it too)."""
    voter, status = votes["voter"], votes["status"]
    generate_button.click(lambda: ("", ""), None, [votes["answer-B"], status], api_visibility="private")
    another = votes["another"].click(handlers.another, [*controls[3:6], controls[7], visit], [votes["answer-B"], visit],
                                     api_name="another_answer", concurrency_limit=max_batch)
    votes["rate"].click(handlers.rate, [votes["which"], votes["rating"], voter, visit], status, api_name="rate",
                        concurrency_limit=16)
    votes["prefer"].click(handlers.prefer, [votes["choice"], voter, visit], status, api_name="prefer",
                          concurrency_limit=16)
    for which in ("A", "B"):
        for rating in ("up", "down"):
            votes[f"{which}-{rating}"].click(
                lambda name, state, which=which, rating=rating: handlers.rate(which, rating, name, state),
                [voter, visit], status, api_visibility="undocumented", concurrency_limit=16)
    for choice, _ in COMPARE:
        votes[f"prefer-{choice}"].click(lambda name, state, choice=choice: handlers.prefer(choice, name, state),
                                        [voter, visit], status, api_visibility="undocumented", concurrency_limit=16)
    return another


def load_app_config(argv: list[str]) -> AppConfig:
    cfg = load_inference_settings(AppConfig, argv, TOOL)
    check(cfg.engine_checks() + [
        (cfg.terms is None or os.path.isfile(cfg.terms), "terms", f": {cfg.terms}: no such file"),
    ])
    return cfg


def voting_for(cfg: AppConfig) -> Voting:
    """The page's feedback settings from the command line, said in the log (votes are kept only when asked)."""
    log = get_logger(__name__).info
    terms = Terms.read(cfg.terms) if cfg.terms else None
    store = FeedbackStore(cfg.feedback_db) if cfg.feedback_db else None
    log(f"feedback: votes stored in {cfg.feedback_db}" if store else
        "feedback: votes are not stored (feedback_db=FILE keeps them)")
    if terms:
        log(f"terms: visitors must accept {cfg.terms} (sha256 {terms.sha256[:12]}) before using the page")
    return Voting(store, terms, model_identity(cfg.model, cfg.adapter) if store else {})


def run(cfg: AppConfig) -> int:
    auth = basic_auth(cfg.auth_env)  # before the model loads: a missing variable is one line at once
    voting = voting_for(cfg)
    page = build_page(load_for_inference(cfg), cfg, voting)
    page.queue().launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, auth=auth, **launch_kwargs())
    return 0
