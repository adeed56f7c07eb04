"""A model as it was trained, for inference: a base model (+ adapter) or a merged model, in the bits and with the
template its training run saved (``load_inference_settings``), loaded once (``load_for_inference``) with its
generation engine (``LoadedModel.start_engine``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.common.settings import Layer, key
from alpaca_lora.data.templates import ModelTemplate, Prompter, PromptTemplate, get_template, set_chat_template
from alpaca_lora.inference.engine import Engine, EngineSettings
from alpaca_lora.model import load_model, load_tokenizer, resolve_model
from alpaca_lora.model_args import ModelArguments, adapter_problem, compute_dtype, load_model_settings, resolve_device


@dataclass
class InferenceModel(ModelArguments):
    """The model section for inference: a model, or an adapter on the base it names."""

    model: Optional[str] = key(None, "base or merged model: hub id, directory, .gguf (default: the adapter's base)")
    adapter: Optional[str] = key(None, "LoRA adapter directory written by training")
    seed: int = key(0, "random seed for sampling")


# Without a saved configuration saying otherwise, a model is loaded as it is stored: in 16 bits.
_UNQUANTIZED = Layer("inference default", {"quant": {"bits": 16}})


def load_inference_settings(schema: type, argv: list[str], tool: str):
    """Settings whose model section starts from what the adapter (or merged model) was trained with:
    built-in defaults <- 16 bits <- the saved model section <- the command line."""
    return load_model_settings(schema, argv, tool, defaults=[_UNQUANTIZED])


def inference_settings(schema: type = InferenceModel, **values):
    """Settings built exactly as the command line builds them, from Python (``adapter=DIR``, ...)."""
    return load_inference_settings(schema, [f"{name}={value}" for name, value in values.items()], "generate")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    template: PromptTemplate | ModelTemplate
    name: str
    description: str
    multi_turn: bool = False  # trained on conversations: a chat's earlier turns are shown as turns, not folded
    _engine: Optional[Engine] = field(default=None, repr=False)
    _engine_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def prompter(self) -> Prompter:
        return Prompter(self.template, self.tokenizer, self.multi_turn)

    def prompt(self, instruction: str, input: str = "") -> str:
        return self.prompter.instruction(instruction, input)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt of a chat (``role``/``content`` messages with text content, the user's last), as the model
        was trained: raises ``ConversationError`` naming the message the template cannot render."""
        return self.prompter.prompt(messages)

    def encode(self, prompt: str) -> list[int]:
        return self.prompter.encode(prompt)

    def start_engine(self, settings: EngineSettings | None = None) -> Engine:
        """Starts the model's one generation engine, its batch, queue and KV cache sized by ``settings``. One runs
        at a time: starting another while it runs is an error (``close()`` it first)."""
        with self._engine_lock:
            if self._engine is not None and not self._engine.closed:
                raise RuntimeError("this model's generation engine is already running; close() it first")
            self._engine = Engine(self.model, self.tokenizer, settings)
            return self._engine

    def engine(self, settings: EngineSettings | None = None) -> Engine:
        """The running engine (see ``start_engine``). Given ``settings`` (the form of callers that started it on first
        use), it starts one when none runs; settings other than those it runs with are an error, never ignored."""
        with self._engine_lock:
            running = self._engine if self._engine is not None and not self._engine.closed else None
        if running is None and settings is not None:
            return self.start_engine(settings)
        if running is None:
            raise RuntimeError("no generation engine runs for this model: start one with start_engine(settings)")
        if settings is not None and settings != running.settings:
            raise RuntimeError("this model's generation engine already runs with other settings; close() it first")
        return running


def load_for_inference(settings: InferenceModel) -> LoadedModel:
    """Base (+ adapter) or merged model, on the chosen device, in eval mode, with its template."""
    problem = adapter_problem(settings.adapter) if settings.adapter else None
    if problem:  # settings built in Python, not by load_inference_settings
        raise ConfigError(f"key 'adapter': {problem}")
    if not settings.model:
        raise ConfigError("key 'model' must be set (or adapter= a directory whose training_config.yaml names its base)")
    template = get_template(settings.template)
    device = resolve_device(settings.device)
    path = resolve_model(settings.model)
    tokenizer = load_tokenizer(settings.adapter or path, settings.trust_remote_code)
    if isinstance(template, ModelTemplate):
        set_chat_template(tokenizer, template)  # refuses a tokenizer without a chat template of its own
    model = load_model(path, settings, device)
    if device == "cuda" and settings.quant.bits == 16:
        model.to("cuda")
    if settings.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, settings.adapter)
    model.eval()
    torch.manual_seed(settings.seed)
    bits = settings.quant.bits
    parts = [f"{settings.model} ({f'{bits}-bit' if bits != 16 else compute_dtype(settings, device)})"]
    parts += [f"adapter {settings.adapter}"] if settings.adapter else []
    turns = ", in turns" if settings.multi_turn and not isinstance(template, ModelTemplate) else ""
    description = " + ".join(parts) + f", template {template.name}{turns}, {device}"
    name = Path(settings.adapter or settings.model).name
    return LoadedModel(model, tokenizer, template, name, description, bool(settings.multi_turn))


