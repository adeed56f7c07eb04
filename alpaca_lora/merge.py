"""Merge a LoRA adapter into its base: ``alpaca-lora merge adapter=DIR output=DIR [key=value ...]``

The base is loaded in 16-bit (or 32-bit), never 4- or 8-bit: peft merging into a quantized base
rounds the update away, the classic way a merged QLoRA model silently loses its adapter. With
``dequantize=true`` the base is loaded exactly as QLoRA trained on it (NF4) and dequantized first,
so the merged weights are the ones the adapter saw. Either way the merge is verified (next-token
logits of base+adapter against the merged model, and the adapter's effect against the bare base),
reported in ``merge_report.json``, and the directory appears atomically.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import yaml
from omegaconf import MISSING

from alpaca_lora.common.errors import MergeError
from alpaca_lora.common.paths import atomic_directory, cannot_write
from alpaca_lora.common.settings import check, entry_point, help_text, key
from alpaca_lora.data.examples import left_padded_prompts
from alpaca_lora.data.templates import Prompter, get_template, set_chat_template
from alpaca_lora.model import DTYPES, load_model, load_tokenizer, resolve_model
from alpaca_lora.model_args import (
    SAVED_CONFIG,
    ModelArguments,
    load_model_settings,
    quantization_config,
    saved_config,
    saved_config_path,
)

TOOL = "merge"
PROBES = [("Give three tips for staying healthy.", ""), ("Translate the sentence into French.", "Good morning!"),
          ("What is the capital of France?", "")]
# Largest |merged - (base+adapter)| logit difference accepted, relative to the largest |logit|.
# (16-bit merges round W + BA once more than the unmerged model does.)
RELATIVE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}
# bitsandbytes' own 4-bit matmuls differ from a dense matmul with the same 4-bit values by about 1%
# (relative, measured on CPU); the original 16-bit base differs from the 4-bit one by tens of percent.
NF4_CONSISTENCY = 0.1


@dataclass
class MergeConfig(ModelArguments):
    model: Optional[str] = key(None, "base model (default: the one the adapter was trained on)")
    device: str = key("cpu", "cpu or cuda (the merge needs the 16-bit model in that device's memory)")
    adapter: str = key(MISSING, "adapter directory written by training")
    output: str = key(MISSING, "directory for the merged model (must not exist unless overwrite=true)")
    dequantize: bool = key(False, "merge into the NF4-dequantized base QLoRA trained on, not the original 16-bit one")
    dtype: str = key("auto", "dtype of the merged weights: auto (the base's own), bfloat16, float16 or float32")
    max_shard_size: str = key("5GB", "largest safetensors shard")
    overwrite: bool = key(False, "replace an existing output directory")
    tolerance: Optional[float] = key(None, "relative logit difference allowed "
                                           "(default: 1e-4 fp32, 5e-2 bf16, 2e-2 fp16)")


def load_merge_config(argv: list[str]) -> MergeConfig:
    """Built-in defaults <- the adapter's saved model section (its base, bits, template) <- the command line."""
    cfg: MergeConfig = load_model_settings(MergeConfig, argv, TOOL, checks=_merge_checks)
    check(_inputs_the_output_would_destroy(cfg) or [
        (not Path(cfg.output).exists() or cfg.overwrite, "output",
         f": {cfg.output} exists; choose another directory or set overwrite=true"),
    ])
    return cfg


def _merge_checks(cfg: MergeConfig) -> list[tuple]:
    unwritable = cannot_write(cfg.output)  # before the merge, not after it (PermissionError)
    return [
        (cfg.dtype == "auto" or cfg.dtype in DTYPES, "dtype", f"must be auto or one of {', '.join(DTYPES)}"),
        (cfg.device in ("cpu", "cuda"), "device", "must be cpu or cuda"),
        (not unwritable, "output", f": {unwritable}; choose another directory"),
    ]


def _inputs_the_output_would_destroy(cfg: MergeConfig) -> list[tuple[bool, str, str]]:
    """The output is written in a temporary directory beside it and renamed into place, replacing
    what was there: it must be neither the adapter nor the base, nor inside or around either of them,
    however the paths are spelled (symlinks resolved)."""
    output = Path(cfg.output).expanduser().resolve()
    problems = []
    for role, spec in (("adapter", cfg.adapter), ("base model", cfg.model)):
        if not Path(spec).expanduser().exists():
            continue  # a hub id: its files are in the Hugging Face cache, not at a path of the user's
        path = Path(spec).expanduser().resolve()
        relation = "is the" if output == path else "is inside the" if output.is_relative_to(path) else \
            "contains the" if path.is_relative_to(output) else None
        if relation:
            problems.append((False, "output", f": {cfg.output} {relation} {role} {spec}: the merge would destroy "
                                              "it (overwrite=true does not change this); choose another directory"))
    return problems


def merge(cfg: MergeConfig) -> dict:
    from peft import PeftModel

    trained_bits = saved_config(cfg.adapter).get("quant", {}).get("bits")
    template = get_template(cfg.template)
    path = resolve_model(cfg.model)
    tokenizer = set_chat_template(load_tokenizer(cfg.adapter, cfg.trust_remote_code), template,
                                  bool(cfg.multi_turn))  # travels with the merged model
    dtype = _merge_dtype(cfg.dtype, path)
    prompter = Prompter(template, tokenizer, bool(cfg.multi_turn))
    probes = left_padded_prompts(tokenizer, [prompter.instruction(*probe) for probe in PROBES], prompter.encode)

    sixteen_bit = replace(cfg, quant=replace(cfg.quant, bits=16))
    base = load_model(path, sixteen_bit, cfg.device, dtype="float32" if cfg.dequantize else _dtype_name(dtype))
    base.to(cfg.device)
    four_bit = replace(cfg, quant=replace(cfg.quant, bits=4))
    if cfg.dequantize:
        if trained_bits not in (None, 4):
            raise MergeError(f"dequantize=true needs a 4-bit (QLoRA) adapter; {cfg.adapter} was trained with "
                             f"{trained_bits}-bit weights")
        _round_trip_through_nf4(base, quantization_config(four_bit, cfg.device))
        base.to(dtype)
    model = PeftModel.from_pretrained(base, cfg.adapter)
    base_logits, adapted_logits = _logits(model, probes, with_adapter=False), _logits(model, probes)

    watched = _lora_targets(model)
    before = {name: module.base_layer.weight.detach().clone() for name, module in watched}
    merged = model.merge_and_unload()
    merged_logits = _logits(merged, probes)
    changed = sum(not torch.equal(_weight(merged, name), before[name]) for name, _ in watched)

    scale = adapted_logits.abs().max().item()
    difference = (merged_logits - adapted_logits).abs().max().item()
    effect = (adapted_logits - base_logits).abs().max().item()
    merged_effect = (merged_logits - base_logits).abs().max().item()
    tolerance = cfg.tolerance if cfg.tolerance is not None else RELATIVE_TOLERANCE[_dtype_name(dtype)]
    report = {
        "adapter": str(cfg.adapter), "base": cfg.model, "dequantized_nf4_base": cfg.dequantize,
        "adapter_trained_bits": trained_bits,
        "dtype": _dtype_name(dtype), "template": template.name, "probe_prompts": len(PROBES),
        "max_logit_difference_merged_vs_adapter": difference,
        "relative_difference": difference / scale, "tolerance": tolerance,
        "max_logit_difference_adapter_vs_base": effect, "max_logit_difference_merged_vs_base": merged_effect,
        "lora_weights_checked": len(watched), "lora_weights_changed": int(changed),
    }
    if cfg.dequantize:  # the same adapter on the 4-bit model it was trained on, as bitsandbytes computes it
        report["relative_difference_vs_4bit_model"] = _vs_4bit_model(path, four_bit, probes, adapted_logits) / scale
        if report["relative_difference_vs_4bit_model"] > NF4_CONSISTENCY:
            raise MergeError("the dequantized base does not reproduce the 4-bit model "
                             f"({report['relative_difference_vs_4bit_model']:.2e} "
                             f"relative > {NF4_CONSISTENCY}); nothing was written")
    if difference / scale > tolerance:
        raise MergeError(f"the merged model's logits differ from base+adapter by {difference:.4g} "
                         f"({difference / scale:.2e} relative > tolerance {tolerance:g}); nothing was written")
    if merged_effect <= difference or changed == 0:  # the merged model is no closer to base+adapter than to base
        raise MergeError(f"the merge lost the adapter: merged logits move {merged_effect:.3g} from the base, "
                         f"{changed} of {len(watched)} adapted weights changed; nothing was written")
    _save(merged, tokenizer, cfg, report)
    return report


def _round_trip_through_nf4(model, nf4) -> None:
    """Replaces each weight that 4-bit loading quantizes (every linear layer but the output head) by
    its 4-bit values, quantized and dequantized with bitsandbytes exactly as loading does.

    (transformers' ``dequantize()`` of a CPU-loaded 4-bit model returned different weights here.)
    """
    import bitsandbytes.functional as bnbf

    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            packed, state = bnbf.quantize_4bit(module.weight.data.float(), quant_type=nf4.bnb_4bit_quant_type,
                                               compress_statistics=nf4.bnb_4bit_use_double_quant)
            module.weight.data = bnbf.dequantize_4bit(packed, state).to(module.weight.dtype)


def _vs_4bit_model(path: str, cfg: MergeConfig, probes: dict, adapted: torch.Tensor) -> float:
    from peft import PeftModel

    quantized = load_model(path, cfg, cfg.device)
    reference = _logits(PeftModel.from_pretrained(quantized, cfg.adapter), probes)
    return (reference - adapted).abs().max().item()


def _merge_dtype(name: str, path: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    from transformers import AutoConfig

    saved = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    saved = DTYPES.get(saved, saved) if isinstance(saved, str) else saved
    return saved if saved in DTYPES.values() else torch.bfloat16


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


@torch.no_grad()
def _logits(model, batch: dict, with_adapter: bool = True) -> torch.Tensor:
    """Next-token logits after each probe prompt, in float32."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if with_adapter:
        return model(**batch).logits[:, -1].float().cpu()
    with model.disable_adapter():
        return model(**batch).logits[:, -1].float().cpu()


def _lora_targets(model) -> list:
    """The first and the last LoRA-adapted layers: their weights must change in the merge."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    return [layers[0], layers[-1]] if len(layers) > 1 else layers


def _weight(merged, peft_name: str) -> torch.Tensor:
    name = peft_name.removeprefix("base_model.model.")
    return merged.get_submodule(name).weight.detach()


def _save(merged, tokenizer, cfg: MergeConfig, report: dict) -> None:
    """The merged model, its tokenizer, the adapter's training configuration (now describing a 16-bit
    model) and the report, in a directory that appears in one piece."""
    saved = yaml.safe_load(saved_config_path(cfg.adapter).read_text(encoding="utf-8")) if \
        saved_config_path(cfg.adapter) else {"config": {"template": cfg.template, "multi_turn": cfg.multi_turn}}
    saved["config"]["quant"] = {**saved["config"].get("quant", {}), "bits": 16}
    saved["merged"] = {"adapter": str(cfg.adapter), "base": cfg.model, "dequantized_nf4_base": cfg.dequantize}
    with atomic_directory(cfg.output, replace=cfg.overwrite) as tmp:
        merged.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / SAVED_CONFIG).write_text(yaml.safe_dump(saved, sort_keys=False))
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")


def run(cfg: MergeConfig) -> int:
    report = merge(cfg)
    print(f"merged {cfg.adapter} into {report['base']} ({report['dtype']}"
          f"{', NF4-dequantized' if cfg.dequantize else ''}) -> {cfg.output}")
    print(f"verified on {report['probe_prompts']} prompts: merged vs base+adapter max logit difference "
          f"{report['max_logit_difference_merged_vs_adapter']:.3g} (relative {report['relative_difference']:.1e}, "
          f"tolerance {report['tolerance']:g}); the adapter moves logits by "
          f"{report['max_logit_difference_adapter_vs_base']:.3g}; report: {Path(cfg.output) / 'merge_report.json'}")
    if report["adapter_trained_bits"] == 4 and not cfg.dequantize:
        print("note: this adapter was trained on a 4-bit base; dequantize=true merges it into the NF4 weights "
              "it saw, which reproduces base+adapter as trained (see the README)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry_point(argv, lambda: help_text(TOOL, "adapter=DIR output=DIR [key=value ...]", MergeConfig),
                       load_merge_config, run) or 0


if __name__ == "__main__":
    sys.exit(main())
