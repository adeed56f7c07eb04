"""What generation, the app, the server and evaluation share: loading a base model (+ adapter) or a
merged model with the template it was trained with, explicit decoding settings, batched and
streamed generation on the model's generation engine (alpaca_lora.engine)."""

from __future__ import annotations

import threading
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator, Optional

import torch

from alpaca_lora.data.examples import encode_prompt
from alpaca_lora.data.templates import PromptTemplate, get_template
from alpaca_lora.engine import Engine, EngineRequest, EngineSettings, Sampling, generate_texts
from alpaca_lora.errors import ConfigError, UserError
from alpaca_lora.model import load_model, load_tokenizer, resolve_model
from alpaca_lora.model_args import ModelArguments, compute_dtype, model_checks, resolve_device, saved_model_layer
from alpaca_lora.settings import Layer, build, check, command_line, key, peek

DECODING_MODES = ("greedy", "sample", "beam")
_ONLY_IN = {"temperature": "sample", "top_p": "sample", "top_k": "sample", "num_beams": "beam"}


@dataclass
class Decoding:
    """Decoding is chosen, not inferred: a setting that has no effect in the mode is an error."""

    decoding: str = key("greedy", "greedy, sample (temperature, top_p, top_k) or beam (num_beams)")
    max_new_tokens: int = key(256, "most tokens to generate")
    temperature: Optional[float] = key(None, "sampling temperature (decoding=sample; default 1.0)")
    top_p: Optional[float] = key(None, "nucleus sampling: smallest token set with this probability (decoding=sample)")
    top_k: Optional[int] = key(None, "sample among the k most likely tokens (decoding=sample)")
    num_beams: Optional[int] = key(None, "beams (decoding=beam; default 4)")
    repetition_penalty: Optional[float] = key(None, "penalise repeated tokens (>1), in any mode")

    def validate(self) -> None:
        checks = [(self.decoding in DECODING_MODES, "decoding", f"must be one of {', '.join(DECODING_MODES)}")]
        checks += [(getattr(self, name) is None or self.decoding == mode, name,
                    f"has no effect with decoding={self.decoding}; use decoding={mode} or leave {name} unset")
                   for name, mode in _ONLY_IN.items()]
        checks += [
            (self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
            (self.temperature is None or self.temperature > 0, "temperature", "must be positive"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k is None or self.top_k >= 1, "top_k", "must be at least 1"),
            (self.num_beams is None or self.num_beams >= 2, "num_beams", "must be at least 2"),
            (self.repetition_penalty is None or self.repetition_penalty > 0, "repetition_penalty", "must be positive"),
        ]
        check(checks)

    def sampling(self, stop_strings: list[str] | None = None, strip: bool = True) -> Sampling:
        """Every generation setting spelled out, so a model's generation_config cannot change the mode."""
        sample = self.decoding == "sample"
        return Sampling(max_new_tokens=self.max_new_tokens, temperature=(self.temperature or 1.0) if sample else 0.0,
                        top_p=(self.top_p or 1.0) if sample else 1.0, top_k=(self.top_k or 0) if sample else 0,
                        num_beams=(self.num_beams or 4) if self.decoding == "beam" else 1,
                        repetition_penalty=self.repetition_penalty, stop=tuple(s for s in stop_strings or () if s),
                        strip=strip)


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
    adapter, model = peek(argv, "adapter"), peek(argv, "model")
    directory = adapter or model
    saved = saved_model_layer(directory, adapter=bool(adapter)) if directory and Path(directory).is_dir() else None
    settings = build(schema, [_UNQUANTIZED, *([saved] if saved else []), command_line(argv, schema)], tool)
    check(model_checks(settings))
    return settings


def inference_settings(schema: type = InferenceModel, **values):
    """Settings built exactly as the command line builds them, from Python (``adapter=DIR``, ...)."""
    return load_inference_settings(schema, [f"{name}={value}" for name, value in values.items()], "generate")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    template: PromptTemplate
    name: str
    description: str
    _engine: Optional[Engine] = field(default=None, repr=False)
    _engine_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def prompt(self, instruction: str, input: str = "") -> str:
        return self.template.format(instruction, input)

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def engine(self, settings: EngineSettings | None = None) -> Engine:
        """The model's one generation engine, started on first use (with ``settings``; later calls share it)."""
        with self._engine_lock:
            if self._engine is None or self._engine.closed:
                self._engine = Engine(self.model, self.tokenizer, settings)
            return self._engine


def load_for_inference(settings: InferenceModel) -> LoadedModel:
    """Base (+ adapter) or merged model, on the chosen device, in eval mode, with its template."""
    if settings.adapter and not (Path(settings.adapter) / "adapter_config.json").is_file():
        raise UserError(f"adapter '{settings.adapter}': no adapter_config.json there (a directory written by training)")
    if not settings.model:
        raise ConfigError("key 'model' must be set (or adapter= a directory whose training_config.yaml names its base)")
    template = get_template(settings.template)
    device = resolve_device(settings.device)
    path = resolve_model(settings.model)
    tokenizer = load_tokenizer(settings.adapter or path, settings.trust_remote_code)
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
    description = " + ".join(parts) + f", template {template.name}, {device}"
    name = Path(settings.adapter or settings.model).name
    return LoadedModel(model, tokenizer, template, name, description)


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16,
                   progress: str | None = None, decoding: Decoding | None = None) -> list[str]:
    """Responses to ``prompts`` (greedy unless ``decoding`` says otherwise), ``batch_size`` generated together
    by a generation engine: the batch API for code that holds a model (evaluation, during training too)."""
    sampling = (decoding or Decoding(max_new_tokens=max_new_tokens)).sampling()
    return generate_texts(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], sampling, batch_size,
                          progress)


class Generation:
    """One generation on the model's engine, streamed: iterating (or ``async for``) yields new response
    text as it comes (beam search: all at the end). It ends at EOS, at ``max_new_tokens``, at a stop
    string (not included in the text), or at ``cancel()`` (also when the reader stops early); then
    ``text``, ``finish_reason`` ("stop" or "length") and token counts are known."""

    def __init__(self, loaded: LoadedModel, prompt: str, decoding: Decoding, stop_strings: list[str] | None = None,
                 strip: bool = True):
        self.loaded, self.sampling = loaded, decoding.sampling(stop_strings, strip)
        self.prompt_ids = loaded.encode(prompt)
        self.request: EngineRequest | None = None

    def _start(self) -> EngineRequest:
        if self.request is None:
            self.request = self.loaded.engine().submit(self.prompt_ids, self.sampling)[0]
        return self.request

    def __iter__(self) -> Iterator[str]:
        for delta in self._start():
            yield delta.text

    async def __aiter__(self) -> AsyncIterator[str]:
        async with aclosing(self._start().deltas()) as deltas:
            async for delta in deltas:
                yield delta.text

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()

    @property
    def text(self) -> str:
        return self.request.text if self.request else ""

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason if self.request else None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return self.request.completion_tokens if self.request else 0
