"""Export a fine-tuned model for llama.cpp and Ollama:
``alpaca-lora export format=gguf (adapter=DIR | model=DIR) output=FILE.gguf [outtype=f16|bf16|q8_0]``

An adapter is merged first (the verified merge of alpaca_lora.merge). The conversion is llama.cpp's own
``convert_hf_to_gguf.py``, from a llama.cpp checkout (``llama_cpp=PATH``) or from the pinned
llama-cpp-python source distribution (it vendors llama.cpp), fetched once through pip into the cache.
The model's tokenizer goes in with the training template as its chat template, so llama.cpp and
Ollama prompt the model as it was trained; a vocabulary-only conversion first checks that the converter
knows the architecture and the tokenizer, before any expensive work. The GGUF appears atomically, with an
Ollama Modelfile beside it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from alpaca_lora.common.errors import ExportError
from alpaca_lora.common.paths import atomic_write_text, cache_dir, cannot_write, publish, scratch_directory
from alpaca_lora.common.settings import entry_point, help_text, key
from alpaca_lora.data.templates import (
    ModelTemplate,
    PromptTemplate,
    get_template,
    instruction_header,
    ollama_template,
    set_chat_template,
)
from alpaca_lora.model_args import ModelArguments, load_model_settings

TOOL = "export"
# llama.cpp's converter comes from this source distribution (vendor/llama.cpp); its CHANGELOG names the commit.
CONVERTER_PACKAGE = "llama-cpp-python"
CONVERTER_VERSION = "0.3.36"
CONVERTER_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
OUTTYPES = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # bytes per weight in the GGUF
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")


@dataclass
class ExportConfig(ModelArguments):
    model: Optional[str] = key(None, "merged (or fully fine-tuned) model directory; with adapter=, its base "
                                     "(default: the one the adapter was trained on)")
    device: str = key("cpu", "cpu or cuda (where an adapter is merged)")
    format: str = key(MISSING, "gguf (llama.cpp, Ollama)")
    output: str = key(MISSING, "the .gguf file to write; an Ollama Modelfile is written beside it (FILE.Modelfile)")
    adapter: Optional[str] = key(None, "adapter directory written by training: merged first, as alpaca-lora merge does")
    outtype: str = key("f16", "weights in the GGUF: f16, bf16 or q8_0")
    llama_cpp: Optional[str] = key(None, "llama.cpp checkout with convert_hf_to_gguf.py (default: the one in "
                                         f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}'s sources, fetched once)")
    dequantize: bool = key(False, "merge into the NF4-dequantized base QLoRA trained on (see alpaca-lora merge)")
    overwrite: bool = key(False, "replace an existing output file and Modelfile")


def load_export_config(argv: list[str]) -> ExportConfig:
    """Built-in defaults <- the adapter's (or merged model's) saved model section <- the command line."""
    return load_model_settings(ExportConfig, argv, TOOL, checks=_export_checks)


def _export_checks(cfg: ExportConfig) -> list[tuple]:
    """The export's own keys, and an output it can write, before anything is converted."""
    output = Path(cfg.output)
    outputs, unwritable = (output, modelfile_path(output)), cannot_write(output)
    return [
        (cfg.format == "gguf", "format", "must be gguf"),
        (cfg.outtype in OUTTYPES, "outtype", f"must be one of {', '.join(OUTTYPES)}"),
        (cfg.device in ("cpu", "cuda"), "device", "must be cpu or cuda"),
        (output.suffix == ".gguf", "output", f": {output} must end in .gguf"),
        (cfg.adapter or cfg.model, "model", "or 'adapter' must be set (a merged model, or an adapter to merge first)"),
        (cfg.adapter or not cfg.model or (Path(cfg.model) / "config.json").is_file(), "model",
         f": {cfg.model} has no config.json (a merged model directory)"),
        *[(not path.is_dir(), "output", f": {path} is a directory; name the file to write") for path in outputs],
        *[(cfg.overwrite or not path.exists() or path.is_dir(), "output",
           f": {path} exists; choose another file or set overwrite=true") for path in outputs],
        (not unwritable, "output", f": {unwritable}; choose another directory"),
    ]


def modelfile_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".Modelfile")


def converter_dir(llama_cpp: str | None = None) -> Path:
    """A llama.cpp source tree with the converter: the one given, or llama-cpp-python's, fetched once."""
    if llama_cpp:
        root = Path(llama_cpp).expanduser().absolute()  # the converter runs in its own directory
        if not (root / "convert_hf_to_gguf.py").is_file() or not (root / "gguf-py").is_dir():
            raise ExportError(f"key 'llama_cpp': {root} has no convert_hf_to_gguf.py and gguf-py/ "
                              "(a llama.cpp checkout)")
        return root
    cache = cache_dir("llama.cpp")
    root = cache / f"llama_cpp_python-{CONVERTER_VERSION}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    sdist = fetch_sdist()
    unpacked = cache / f"llama_cpp_python-{CONVERTER_VERSION}"
    try:
        with scratch_directory(unpacked) as tmp, tarfile.open(sdist) as archive:
            prefix = f"{unpacked.name}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(CONVERTER_FILES)]
            archive.extractall(tmp, members=members, filter="data")
            publish(tmp / unpacked.name, unpacked)
    except OSError:
        if not (root / "convert_hf_to_gguf.py").is_file():  # not another process that unpacked it first
            raise
    return root


def fetch_sdist() -> Path:
    """The pinned llama-cpp-python source distribution in the cache, downloaded once through pip (hash-checked)."""
    cache = cache_dir("llama.cpp")
    sdist = cache / f"llama_cpp_python-{CONVERTER_VERSION}.tar.gz"
    if sdist.is_file():
        return sdist
    print(f"fetching llama.cpp's converter (llama.cpp {LLAMA_CPP_COMMIT}): {CONVERTER_PACKAGE}=={CONVERTER_VERSION} "
          f"(source, once) into {cache}", flush=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        requirement = Path(tmp) / "requirement.txt"
        requirement.write_text(f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION} --hash=sha256:{CONVERTER_SHA256}\n")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                               "--require-hashes", "-r", str(requirement), "-d", tmp], capture_output=True, text=True)
        downloaded = Path(tmp) / sdist.name
        if done.returncode != 0 or not downloaded.is_file():
            last = (done.stderr.strip().splitlines() or ["no file"])[-1]
            raise ExportError(f"cannot fetch llama.cpp's converter ({CONVERTER_PACKAGE}=={CONVERTER_VERSION} through "
                              f"pip): {last}; give llama_cpp=PATH (a llama.cpp checkout) instead")
        publish(downloaded, sdist)
    return sdist


def export(cfg: ExportConfig) -> dict:
    output = Path(cfg.output)
    if importlib.util.find_spec("sentencepiece") is None:
        raise ExportError("llama.cpp's converter needs the sentencepiece package: pip install sentencepiece")
    converter = converter_dir(cfg.llama_cpp)
    template = get_template(cfg.template)
    tokenizer = _tokenizer(cfg, template)
    with scratch_directory(output) as work:  # the converter's inputs, the merged model, the GGUF being written
        config = _config(cfg)
        _convert(converter, _stage(tokenizer, work / "vocab", config=config), work / "vocab.gguf", cfg.outtype,
                 vocab_only=True)  # the converter knows the architecture and the tokenizer: worth merging
        _check_disk(config, output.parent, cfg)
        model_dir = _merge(cfg, work / "merged") if cfg.adapter else Path(cfg.model)
        _convert(converter, _stage(tokenizer, work / "model", model_dir=model_dir), work / "model.gguf", cfg.outtype)
        summary = _check_gguf(work / "model.gguf", tokenizer)
        publish(work / "model.gguf", output)
    atomic_write_text(modelfile_path(output), modelfile(output, template, tokenizer, bool(cfg.multi_turn)))
    turns = " in turns" if cfg.multi_turn and not isinstance(template, ModelTemplate) else ""
    return {**summary, "template": template.name + turns, "output": str(output),
            "modelfile": str(modelfile_path(output))}


def _tokenizer(cfg: ExportConfig, template: PromptTemplate | ModelTemplate):
    from alpaca_lora.model import load_tokenizer

    return set_chat_template(load_tokenizer(cfg.adapter or cfg.model, cfg.trust_remote_code), template,
                             bool(cfg.multi_turn))


def _config(cfg: ExportConfig):
    """The model's (or the adapter's base's) config: a hub id, a directory or a GGUF file, as for merging."""
    from transformers import AutoConfig

    from alpaca_lora.model import resolve_model

    try:
        return AutoConfig.from_pretrained(resolve_model(cfg.model), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ExportError(f"model '{cfg.model}': cannot load its config: {str(exc).splitlines()[0]}") from None


def _stage(tokenizer, stage: Path, model_dir: Path | None = None, config=None) -> Path:
    """The directory the converter reads: the tokenizer with the chat template, and the model's files (linked)
    or, for a vocabulary-only run, its config."""
    stage.mkdir()
    tokenizer.save_pretrained(stage)
    if config is not None:
        config.save_pretrained(stage)
    for source in model_dir.iterdir() if model_dir else []:
        if source.name not in TOKENIZER_FILES and not (stage / source.name).exists():
            (stage / source.name).symlink_to(source.resolve())
    return stage


def _convert(converter: Path, stage: Path, target: Path, outtype: str, vocab_only: bool = False) -> None:
    """Runs convert_hf_to_gguf.py with this Python; its progress bar is shown, its last lines explain a failure."""
    # The converter runs in its own directory (it reads files beside it): every path it gets is absolute.
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(stage.absolute()), "--outfile",
               str(target.absolute()), "--outtype", outtype] + (["--vocab-only"] if vocab_only else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    tail: deque[str] = deque(maxlen=200)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=converter) as process:
        pending = ""
        while chunk := process.stdout.read1(4096).decode("utf-8", "replace"):
            *lines, pending = (pending + chunk).replace("\r", "\n").split("\n")
            for line in lines:
                if line.startswith("Writing:") and not vocab_only:
                    print(f"\r{line}", end="", file=sys.stderr, flush=True)
                elif line.strip():
                    tail.append(line)
        if pending.strip():
            tail.append(pending)
    if not vocab_only:
        print(file=sys.stderr)
    if process.returncode != 0:
        raise ExportError(_conversion_failure(stage, list(tail)))


def _conversion_failure(stage: Path, tail: list[str]) -> str:
    text = "\n".join(tail)
    architectures = json.loads((stage / "config.json").read_text()).get("architectures") or ["?"]
    if "is not supported" in text:
        return f"llama.cpp's converter does not support the architecture {architectures[0]}"
    if "BPE pre-tokenizer was not recognized" in text:
        return ("llama.cpp's converter does not recognise this tokenizer's pre-tokenizer (it knows those of published "
                "models by a hash of their output): use a tokenizer of a model llama.cpp supports")
    errors = [line for line in tail if "Error" in line or line.startswith("ERROR")] or tail or ["no output"]
    return f"llama.cpp's converter failed: {errors[-1].strip()}"


def _weights(config) -> int:
    """Parameter count, from the config on the meta device (no weights are loaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _check_disk(config, where: Path, cfg: ExportConfig) -> None:
    """The merged model (when merging) and the GGUF both live beside the output for a while: refuse early."""
    weights = _weights(config)
    need = weights * OUTTYPES[cfg.outtype]
    if cfg.adapter:  # merged in the base's own dtype
        need += weights * (4 if str(getattr(config, "dtype", None)).endswith("float32") else 2)
    need *= 1.05
    free = shutil.disk_usage(where).free
    if free < need:
        raise ExportError(f"not enough disk space in {where.resolve()}: the export needs about {need / 1e9:.1f} GB "
                          f"({'merged model and ' if cfg.adapter else ''}GGUF), {free / 1e9:.1f} GB are free")


def _merge(cfg: ExportConfig, target: Path) -> Path:
    from alpaca_lora.merge import load_merge_config, merge

    report = merge(load_merge_config([f"adapter={cfg.adapter}", f"output={target}", f"model={cfg.model}",
                                      f"template={cfg.template}", f"device={cfg.device}",
                                      f"dequantize={str(cfg.dequantize).lower()}",
                                      f"trust_remote_code={str(cfg.trust_remote_code).lower()}"]))
    print(f"merged {cfg.adapter} into {report['base']} ({report['dtype']}); verified: relative logit difference "
          f"{report['relative_difference']:.1e} (tolerance {report['tolerance']:g})", flush=True)
    return target


def _check_gguf(path: Path, tokenizer) -> dict:
    """What llama.cpp and Ollama will read: the chat template and EOS must be the training ones."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(name: str):
        found = reader.get_field(name)
        return found.contents() if found is not None else None

    if field("tokenizer.chat_template") != tokenizer.chat_template:
        raise ExportError(f"the converter did not store the chat template in {path.name}")
    if field("tokenizer.ggml.eos_token_id") != tokenizer.eos_token_id:
        raise ExportError(f"the GGUF's EOS id {field('tokenizer.ggml.eos_token_id')} is not the tokenizer's "
                          f"({tokenizer.eos_token_id}, {tokenizer.eos_token})")
    return {"architecture": field("general.architecture"), "tensors": len(reader.tensors),
            "eos_token_id": tokenizer.eos_token_id, "bytes": path.stat().st_size}


def modelfile(output: Path, template: PromptTemplate | ModelTemplate, tokenizer, multi_turn: bool = False) -> str:
    """An Ollama Modelfile: the GGUF, the training prompt as TEMPLATE (in turns for a model trained on
    conversations), and where to stop. With template=model there is no TEMPLATE: Ollama takes the chat template
    from the GGUF, as it does for the base model's own."""
    stops = [tokenizer.eos_token] + [header for header in [instruction_header(template)] if header]
    if isinstance(template, ModelTemplate):
        how = "# TEMPLATE: none; the GGUF carries the base model's own chat template (template=model)"
    else:
        how = f'TEMPLATE """{ollama_template(template, multi_turn, tokenizer.eos_token)}"""'
    lines = [f"# Ollama: ollama create {output.stem} -f {modelfile_path(output).name}", f"FROM ./{output.name}", how]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def run(cfg: ExportConfig) -> int:
    summary = export(cfg)
    print(f"wrote {summary['output']} ({summary['architecture']}, {summary['tensors']} tensors, {cfg.outtype}, "
          f"{summary['bytes'] / 1e6:.0f} MB; chat template: {summary['template']}; EOS id {summary['eos_token_id']}) "
          f"and {summary['modelfile']}")
    print(f"run it: ollama create {Path(cfg.output).stem} -f {summary['modelfile']}  |  "
          f"llama-cli -m {summary['output']}  |  llama-server -m {summary['output']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    usage = "format=gguf (adapter=DIR | model=DIR) output=FILE.gguf [outtype=f16|bf16|q8_0] [key=value ...]"
    return entry_point(argv, lambda: help_text(TOOL, usage, ExportConfig), load_export_config, run) or 0


if __name__ == "__main__":
    sys.exit(main())
