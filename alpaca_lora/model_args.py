"""The model section: which model, prompted how, stored in how many bits, on which device.

One typed section shared by training, planning, inference, merge and export (as LLaMA-Factory shares
its ``ModelArguments``). A training run saves its resolved configuration beside its weights
(``training_config.yaml``); inference and merge read the model section back from there, so an adapter
is loaded on the base, in the bits and with the template it was trained with; ``load_model_settings`` is the
one loader of the commands that load a trained model, and ``adapter_problem`` the one check of an adapter
directory. ``quantization_config`` is the one place that turns the section into a
``transformers.BitsAndBytesConfig``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import yaml

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.common.settings import Layer, build, check, command_line, key, peek

T = TypeVar("T")
SAVED_CONFIG = "training_config.yaml"
LEGACY_SAVED_CONFIGS = ("config.yaml",)  # adapters written before the name was unified
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DTYPE_NAMES = ("bfloat16", "float16", "float32")


@dataclass
class QuantArguments:
    bits: int = key(4, "storage precision of the frozen base: 4 (NF4/FP4), 8 (LLM.int8) or 16 (no quantization)")
    quant_type: str = key("nf4", "4-bit data type: nf4 or fp4")
    double_quant: bool = key(True, "also quantize the 4-bit quantization constants (QLoRA double quantization)")
    compute_dtype: str = key("bfloat16", "dtype of the matmuls and of a 16-bit base on GPU (float32 on CPU)")
    quant_storage: Optional[str] = key(None, "dtype the 4-bit weights are packed in (bfloat16 lets FSDP shard "
                                             "them with the rest; default uint8)")


@dataclass
class ModelArguments:
    model: Optional[str] = key(None, "model: hub id, local directory, .gguf file, or package:MODULE/FILE.gguf")
    template: str = key("alpaca", "prompt template: alpaca, alpaca_lora, a .json/.yaml template file, or model (the "
                                  "base model's own chat template, for instruct bases)")
    multi_turn: Optional[bool] = key(None, "a chat's earlier turns shown as turns (a model trained on conversations) "
                                           "or folded into the template's input (false); default: training decides "
                                           "from the data, inference reads it from training_config.yaml")
    device: str = key("auto", "auto, cuda or cpu (cpu computes in float32)")
    trust_remote_code: bool = key(False, "allow the model repository's own Python code to run")
    quant: QuantArguments = field(default_factory=QuantArguments, metadata={"help": "quantization of the base"})


def model_checks(args: ModelArguments) -> list[tuple[Any, str, str]]:
    """The section's ``(ok, key, message)`` checks, for :func:`alpaca_lora.common.settings.check`."""
    quant = args.quant
    return [
        (quant.bits in (4, 8, 16), "quant.bits", "must be 4, 8 or 16"),
        (quant.quant_type in ("nf4", "fp4"), "quant.quant_type", "must be nf4 or fp4"),
        (quant.compute_dtype in DTYPE_NAMES, "quant.compute_dtype", "must be bfloat16, float16 or float32"),
        (quant.quant_storage in (None, "uint8", *DTYPE_NAMES), "quant.quant_storage",
         "must be uint8, bfloat16, float16 or float32"),
        (args.device in ("auto", "cuda", "cpu"), "device", "must be auto, cuda or cpu"),
    ]


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(args: ModelArguments, device: str) -> str:
    """The section's compute dtype on a GPU; float32 on CPU, where bf16 matmuls are about 2x slower."""
    return args.quant.compute_dtype if device == "cuda" else "float32"


def quantization_config(args: ModelArguments, device: str, sharded: bool = False):
    """The ``BitsAndBytesConfig`` of the base (None for a 16-bit one). ``sharded`` (FSDP) packs 4-bit
    weights in ``quant_storage`` so that FSDP can shard them with the rest."""
    from transformers import BitsAndBytesConfig

    quant = args.quant
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant.bits != 4:
        return None
    storage = quant.quant_storage if sharded and quant.quant_storage not in (None, "uint8") else None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(args, device),
                              **({"bnb_4bit_quant_storage": storage} if storage else {}))


def describe_quantization(config) -> dict | None:
    """The settings of a ``BitsAndBytesConfig`` that matter here, for plans and reports."""
    if config is None:
        return None
    if config.load_in_8bit:
        return {"load_in_8bit": True}
    described = {"load_in_4bit": True, "bnb_4bit_quant_type": config.bnb_4bit_quant_type,
                 "bnb_4bit_use_double_quant": config.bnb_4bit_use_double_quant,
                 "bnb_4bit_compute_dtype": str(config.bnb_4bit_compute_dtype).removeprefix("torch.")}
    storage = str(config.bnb_4bit_quant_storage).removeprefix("torch.")
    if storage != "uint8":
        described["bnb_4bit_quant_storage"] = storage
    return described


def saved_config_path(directory: str | Path | None) -> Path | None:
    """The configuration a training run (or a merge) saved in ``directory``, if any."""
    if not directory:
        return None
    for name in (SAVED_CONFIG, *LEGACY_SAVED_CONFIGS):
        path = Path(directory) / name
        if path.is_file():
            return path
    return None


def saved_config(directory: str | Path | None) -> dict:
    """The ``config`` section a training run (or a merge) saved in ``directory``, or {}."""
    path = saved_config_path(directory)
    if path is None:
        return {}
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable saved configuration ({str(exc).splitlines()[0]})") from None
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: no 'config' section; not a configuration this project wrote")
    return config


def saved_model_layer(directory: str | Path | None, adapter: bool = True) -> Layer | None:
    """The saved model section as a settings layer. An adapter's says which base it goes on, in which
    bits and with which template; a full model's (merged or fully fine-tuned) only its template, since
    the model is the directory itself, stored as it is.

    The device and ``trust_remote_code`` are never inherited: they belong to the machine and the user
    at hand, not to the run that wrote the file.
    """
    config = saved_config(directory)
    if not config:
        return None
    values = {"template": config["template"]} if config.get("template") else {}
    if config.get("multi_turn") is not None:
        values["multi_turn"] = config["multi_turn"]
    if adapter:
        values.update({"model": config["model"]} if config.get("model") else {})
        values["quant"] = {k: v for k, v in (config.get("quant") or {}).items()
                           if k in ("bits", "quant_type", "double_quant", "compute_dtype")}
    return Layer(str(saved_config_path(directory)), values)


def load_model_settings(schema: type[T], argv: list[str], tool: str, defaults: Sequence[Layer] = (),
                        checks: Callable[[T], list] = lambda settings: []) -> T:
    """The settings of a command that loads a trained model (inference, merge, export): built-in defaults <-
    ``defaults`` <- the saved model section of the adapter (or merged model) <- the command line. The model
    section's checks, the adapter's and the command's own (``checks(settings)``) are reported together, before
    any model loads; an adapter's base, when neither the command line nor the saved section gives it, is the one
    its ``adapter_config.json`` names."""
    adapter, model = peek(argv, "adapter"), peek(argv, "model")
    directory = adapter or model
    saved = saved_model_layer(directory, adapter=bool(adapter)) if directory and Path(directory).is_dir() else None
    settings = build(schema, [*defaults, *([saved] if saved else []), command_line(argv, schema)], tool)
    adapter = getattr(settings, "adapter", None)
    problem = adapter_problem(adapter) if adapter else None
    check(model_checks(settings) + [(not problem, "adapter", f": {problem}")] + checks(settings))
    if adapter and not settings.model:
        settings.model = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not settings.model:
            raise ConfigError("key 'model' must be set: the adapter does not name its base model")
    return settings



def adapter_problem(directory: str | Path) -> str | None:
    """Why ``directory`` is not an adapter peft can load, in one line naming the file (None when it is): asked
    before any model loads, where peft would end in a traceback (the hub asked for missing weights, a
    ``SafetensorError``, a ``JSONDecodeError``)."""
    path = Path(directory)
    if not (path / ADAPTER_CONFIG).is_file():
        return f"{directory} has no {ADAPTER_CONFIG} (a directory written by training)"
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{path / ADAPTER_CONFIG}: not valid JSON ({str(exc).splitlines()[0]})"
    if not isinstance(config, dict):
        return f"{path / ADAPTER_CONFIG}: not valid JSON for an adapter (an object is expected)"
    weights = next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        return (f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS[0]} (copied without its weights, or "
                "written by a run that stopped before saving them)")
    return safetensors_problem(weights) if weights.suffix == ".safetensors" else None


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read (a truncated copy, a corrupt header), or None. Only the header is
    read; it also says how long the file must be, so a cut file is caught here."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as weights:
            weights.keys()
    except Exception as exc:  # SafetensorError, OSError
        return f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]}): truncated or corrupt"
    return None
