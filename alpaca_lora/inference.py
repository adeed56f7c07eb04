"""What generation, the app, the server and evaluation share: loading a base model (+ adapter) or a
merged model with the template it was trained with, explicit decoding settings, batched and
streamed generation."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from alpaca_lora.data.examples import encode_prompt, left_padded_prompts
from alpaca_lora.data.templates import PromptTemplate, get_template
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

    def generate_kwargs(self) -> dict:
        """Every generation setting spelled out, so a model's generation_config cannot change the mode."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.decoding == "sample", "num_beams": 1,
                  "temperature": None, "top_p": None, "top_k": None}
        if self.decoding == "sample":
            kwargs.update(temperature=self.temperature or 1.0, top_p=self.top_p or 1.0, top_k=self.top_k or 0)
        if self.decoding == "beam":
            kwargs.update(num_beams=self.num_beams or 4, early_stopping=True)
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


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
    generate_lock: threading.Lock = field(default_factory=threading.Lock)

    def prompt(self, instruction: str, input: str = "") -> str:
        return self.template.format(instruction, input)

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)


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


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16,
                   progress: str | None = None, **generation_kwargs) -> list[str]:
    """Responses to ``prompts`` in left-padded batches; greedy unless ``generation_kwargs`` say otherwise."""
    was_training = model.training
    model.eval()
    generation_kwargs.setdefault("do_sample", False)
    responses = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=progress, disable=progress is None):
        inputs = left_padded_prompts(tokenizer, prompts[start:start + batch_size]).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **generation_kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        responses += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return responses


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Generation:
    """One generation, streamed: iterating yields new response text as it comes (beam search: once,
    at the end). It ends at EOS, at ``max_new_tokens``, at a stop string (not included in the text),
    or when ``cancel`` is set; then ``text``, ``finish_reason`` ("stop" or "length") and token counts
    are known. Generations are serialised: one model, one generation at a time."""

    def __init__(self, loaded: LoadedModel, prompt: str, decoding: Decoding, stop_strings: list[str] | None = None,
                 cancel: threading.Event | None = None, strip: bool = True):
        self.loaded, self.decoding, self.stop_strings = loaded, decoding, [s for s in (stop_strings or []) if s]
        self.strip = strip  # a response to a template prompt; a raw continuation (strip=False) keeps its spaces
        self.cancel = cancel or threading.Event()
        self.prompt_ids = loaded.encode(prompt)
        self.prompt_tokens = len(self.prompt_ids)
        self.text = ""
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        tokenizer = self.loaded.tokenizer
        ids = torch.tensor([self.prompt_ids], device=self.loaded.model.device)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id,
                      stopping_criteria=StoppingCriteriaList([_StopWhenSet(self.cancel)]),
                      **self.decoding.generate_kwargs())
        if self.stop_strings:
            kwargs.update(stop_strings=self.stop_strings, tokenizer=tokenizer)
        output: list[torch.Tensor] = []
        with self.loaded.generate_lock, torch.no_grad():
            if self.decoding.decoding == "beam":
                output.append(self.loaded.model.generate(**kwargs)[0])
                yield from self._emit(tokenizer.decode(output[0][ids.shape[1]:], skip_special_tokens=True), final=True)
            else:
                streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                worker = threading.Thread(target=lambda: output.append(
                    self.loaded.model.generate(**kwargs, streamer=streamer)[0]))
                worker.start()
                raw = ""
                try:
                    for piece in streamer:
                        raw += piece
                        yield from self._emit(raw, final=False)
                        if self.finish_reason:
                            break
                    yield from self._emit(raw, final=True)
                finally:
                    self.cancel.set()  # stops the generation when the consumer stops reading
                    worker.join()
        new = output[0][ids.shape[1]:].tolist() if output else []
        self.completion_tokens = len(new)
        if self.finish_reason is None:
            ended = bool(new) and new[-1] == tokenizer.eos_token_id
            self.finish_reason = "stop" if ended or len(new) < self.decoding.max_new_tokens else "length"

    def _emit(self, raw: str, final: bool) -> Iterator[str]:
        """The part of ``raw`` not yet emitted, up to a stop string, holding back a possible stop prefix."""
        if self.finish_reason:
            return
        raw = raw.lstrip() if self.strip else raw
        end = len(raw)
        for stop in self.stop_strings:
            found = raw.find(stop)
            if found != -1 and found < end:
                end, self.finish_reason = found, "stop"
        if not self.finish_reason and not final:
            end -= max((n for stop in self.stop_strings for n in range(len(stop) - 1, 0, -1)
                        if raw.endswith(stop[:n])), default=0)
        if final and not self.finish_reason and self.strip:
            end = len(raw[:end].rstrip())
        if end > len(self.text):
            piece, self.text = raw[len(self.text):end], raw[:end]
            yield piece
