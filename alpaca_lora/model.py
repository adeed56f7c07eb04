"""Finding and loading a model: a hub id, a local directory, or a GGUF file.

A GGUF file (also one shipped inside an installed Python package, ``package:MODULE/FILE.gguf``)
is converted once into a standard Hugging Face directory in the cache, keyed by the file's hash,
so quantized loading, training and saving all work on it like on any other model.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_lora.common.errors import ModelError
from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.paths import atomic_directory, cache_dir
from alpaca_lora.model_args import ModelArguments, compute_dtype, quantization_config

logger = get_logger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model(spec: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts; GGUF files are converted (once) first."""
    if spec.startswith("package:"):
        module, _, filename = spec.removeprefix("package:").partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ModelError(f"model '{spec}': Python package '{module}' is not installed")
        spec = str(Path(next(iter(found.submodule_search_locations))) / filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model '{spec}': no such GGUF file")
        return str(convert_gguf(path))
    if spec.startswith((".", "/", "~")) and not path.exists():
        raise ModelError(f"model '{spec}': no such directory")
    _require_available(spec)
    return spec


def _require_available(spec: str) -> None:
    """A hub id must be in the Hugging Face cache or on a reachable hub: else one line here, not
    transformers' OSError traceback later. Nothing is downloaded (``from_pretrained`` does that)."""
    if Path(spec).expanduser().exists():
        return
    from huggingface_hub import HfApi, is_offline_mode, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        snapshot_download(spec, local_files_only=True)
        return  # in the cache
    except Exception:  # not cached, or not a valid id: the hub says which below
        pass
    if is_offline_mode():
        reason = "not in the Hugging Face cache, and HF_HUB_OFFLINE=1 keeps the hub off"
    else:
        try:
            HfApi().auth_check(spec)
            return
        except GatedRepoError:
            reason = "gated on the hub: accept its terms there and set HF_TOKEN"
        except RepositoryNotFoundError:
            reason = "no such model on the hub (or a private one: set HF_TOKEN)"
        except Exception as exc:  # no network, or an id the hub rejects
            reason = f"not in the Hugging Face cache, and the hub cannot be reached ({str(exc).splitlines()[0]})"
    raise ModelError(f"model '{spec}': neither on disk nor reachable (not a local path; {reason})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(path: Path) -> Path:
    """Dequantizes a GGUF checkpoint into a cached safetensors directory (with its tokenizer).

    A GGUF-loaded model cannot ``save_pretrained`` directly, so it is rebuilt from its config and
    state dict. The directory appears atomically, so an interrupted conversion is simply redone.
    """
    target = cache_dir("gguf") / f"{path.stem}-{_sha256(path)[:16]}"
    if (target / "config.json").is_file():
        return target
    logger.info(f"converting {path.name} to a Hugging Face model directory (once) in {target}")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now: a plain checkpoint
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with atomic_directory(target, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer with a pad token (falling back to EOS; labels still keep EOS, see data.examples)."""
    _require_available(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model '{path}': cannot load its tokenizer: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_model(path: str, args: ModelArguments, device: str, dtype: str | None = None, sharded: bool = False):
    """The base as the model section says: quantized through bitsandbytes (4 or 8 bits) or in ``dtype``
    (default: the section's compute dtype on this device).

    ``sharded`` (FSDP) leaves placement to FSDP; otherwise each process loads onto its own GPU.
    """
    _require_available(path)
    quantization = quantization_config(args, device, sharded)
    kwargs = {"dtype": DTYPES[dtype or compute_dtype(args, device)], "trust_remote_code": args.trust_remote_code}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device == "cuda" and not sharded:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif quantization is not None and device == "cpu":
        kwargs["device_map"] = {"": "cpu"}
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, SafetensorError) as exc:  # no weights or config.json there, the hub lacks a file, a cut copy
        raise ModelError(f"model '{path}': cannot load it: {str(exc).splitlines()[0]}") from None


def train_adapters_in_float32(model) -> None:
    """TRL stores QLoRA adapters in bf16 (the paper's GPU setting); on CPU, bf16 matmuls are about 2x
    slower than fp32, so without a GPU the trainable parameters are kept in float32."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
