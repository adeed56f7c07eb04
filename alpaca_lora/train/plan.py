"""Will it fit? ``alpaca-lora plan recipe=NAME model=NAME_OR_DIR [gpus=N] [gpu_memory=24GB] [key=value ...]``

Peak GPU memory per device, estimated from the model's shape alone (a local config.json, or a
built-in table of common architectures), before any weights load: weights at their storage
precision (with quantization constants), trainable parameters, gradients, optimizer states,
activations (with or without gradient checkpointing), the logits and loss buffer, FSDP sharding
and a fixed runtime overhead. ``train`` runs the same plan and stops before loading weights when
it predicts out-of-memory (``force=true`` to go on).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.settings import entry_point, key, key_lines
from alpaca_lora.train.architectures import ARCHITECTURES, Architecture, find_architecture
from alpaca_lora.train.config import TrainConfig, load_config
from alpaca_lora.train.runtime import checkpointing

logger = get_logger(__name__)
GIB = 1024**3
OVERHEAD_BYTES = int(0.5 * GIB)  # CUDA context, cuBLAS workspace, allocator slack
NF4_BLOCK = 64  # bitsandbytes 4-bit block size; an fp32 absmax per block
DOUBLE_QUANT_BLOCK = 256  # double quantization: 8-bit absmax, an fp32 constant per 256 blocks


@dataclass(frozen=True)
class Setup:
    """What the plan needs to know about a run, in the planner's terms. It has no defaults of its own:
    a run's setup comes from its :class:`TrainConfig` (``from_config``), whose defaults are the recipes'."""

    finetune: str                     # lora or full
    bits: int                         # storage of the frozen base: 4, 8 or 16
    double_quant: bool
    weight_bytes: int                 # bytes per parameter of 16-bit weights (4: fp32 master weights)
    lora_r: int
    lora_targets: tuple
    lora_dropout: float
    adapter_bytes: int                # LoRA weights, and their gradients
    optimizer: str                    # adamw (32-bit states), adamw_8bit, sgd
    micro_batch: int
    seq_len: int
    checkpointing: bool
    gpus: int
    fsdp: bool
    packing: bool                     # micro_batch rows of seq_len tokens, each holding several sequences
    loss: str = "full"                # full: fp32 logits for every position; chunked: bf16 logits, fp32 per chunk
    rows_per_example: int = 1         # DPO: 2 (a pair's chosen and rejected answers run in one batch)
    reference_adapter: bool = False   # DPO/KTO: a frozen copy of the SFT adapter is the reference policy

    @classmethod
    def from_config(cls, cfg: TrainConfig, gpus: int) -> Setup:
        """A preference run's adapter is the SFT one (its shape in ``cfg.lora``), with TRL's dropout off."""
        optim = cfg.optim.lower()
        preference = cfg.preference_tuning
        return cls(finetune=cfg.finetune, bits=cfg.quant.bits, double_quant=cfg.quant.double_quant,
                   weight_bytes=4 if cfg.finetune == "full" else 2, lora_r=cfg.lora.r,
                   lora_targets=tuple(cfg.lora.target_modules), lora_dropout=0.0 if preference else cfg.lora.dropout,
                   adapter_bytes=4,
                   optimizer="adamw_8bit" if "8bit" in optim else "sgd" if optim.startswith("sgd") else "adamw",
                   micro_batch=cfg.micro_batch_size, seq_len=cfg.max_length,
                   checkpointing=checkpointing(cfg), gpus=gpus, fsdp=bool(cfg.fsdp) and gpus > 1,
                   packing=cfg.packing, rows_per_example=2 if cfg.method == "dpo" else 1, reference_adapter=preference)


_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_shapes(a: Architecture) -> dict[str, tuple[int, int]]:
    head_dim = a.hidden // a.heads
    q, kv = a.heads * head_dim, a.kv_heads * head_dim
    return {"q_proj": (a.hidden, q), "k_proj": (a.hidden, kv), "v_proj": (a.hidden, kv), "o_proj": (q, a.hidden),
            "gate_proj": (a.hidden, a.intermediate), "up_proj": (a.hidden, a.intermediate),
            "down_proj": (a.intermediate, a.hidden)}


@dataclass
class Plan:
    rows: list[tuple[str, float]]     # (component, bytes per GPU)
    parameters: int
    trainable: int

    @property
    def total(self) -> float:
        return sum(size for _, size in self.rows)


def estimate(a: Architecture, s: Setup) -> Plan:
    """Peak memory per GPU, component by component, for architecture ``a`` trained as ``s`` says."""
    shapes = _linear_shapes(a)
    linear = a.layers * sum(i * o for i, o in shapes.values())
    dense = a.vocab * a.hidden * (1 if a.tied else 2) + a.hidden * (2 * a.layers + 1)  # embeddings and norms
    parameters = linear + dense
    shard = s.gpus if s.fsdp else 1
    targets = _LINEARS if "all-linear" in s.lora_targets else [t for t in _LINEARS if t in s.lora_targets]

    rows = [(label, size / shard) for label, size in _frozen_weights(a, s, shapes, linear, dense)]
    if s.finetune == "full":
        trainable, grad_bytes = parameters, s.weight_bytes
    else:
        trainable = a.layers * sum(s.lora_r * (shapes[t][0] + shapes[t][1]) for t in targets)
        grad_bytes = s.adapter_bytes
        rows.append((f"trainable: LoRA r{s.lora_r} on {len(targets)} projections, {trainable / 1e6:.1f}M parameters",
                     trainable * s.adapter_bytes / shard))
        if s.reference_adapter:  # no gradients, no optimizer states: its weights alone
            rows.append(("reference: a frozen copy of the SFT adapter", trainable * s.adapter_bytes / shard))
    rows.append(("gradients", trainable * grad_bytes / shard))
    optimizer_bytes = {"adamw": 8, "adamw_8bit": 2, "sgd": 0}[s.optimizer]
    rows.append((f"optimizer states ({s.optimizer}, {optimizer_bytes} bytes per trainable parameter)",
                 trainable * optimizer_bytes / shard))
    rows += _activations(a, s, shapes, targets)
    if s.fsdp:
        per_param = {4: 0.5 + 1 / NF4_BLOCK, 8: 1.0}.get(s.bits, s.weight_bytes)
        rows.append((f"FSDP: 2 decoder layers gathered unsharded ({s.gpus}-way sharding above)",
                     2 * linear / a.layers * per_param))
    rows.append(("runtime overhead (CUDA context, workspaces, allocator)", OVERHEAD_BYTES))
    return Plan(rows, parameters, trainable)


def _frozen_weights(a: Architecture, s: Setup, shapes: dict, linear: int, dense: int) -> list[tuple[str, float]]:
    """The weights at their storage precision: quantized linear layers (with their constants) and 16-bit
    embeddings and norms, or every weight in ``weight_bytes``."""
    dense_row = (f"weights: {dense / 1e9:.2f}B embeddings and norms in 16-bit", dense * 2)
    if s.bits == 4:
        constants = 4 / NF4_BLOCK if not s.double_quant else 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)
        return [(f"weights: {linear / 1e9:.2f}B in 4-bit NF4 + quantization constants", linear * (0.5 + constants)),
                dense_row]
    if s.bits == 8:
        row_scales = a.layers * sum(o for _, o in shapes.values()) * 4
        return [(f"weights: {linear / 1e9:.2f}B in 8-bit + row scales", linear * 1.0 + row_scales), dense_row]
    return [(f"weights: {(linear + dense) / 1e9:.2f}B in {8 * s.weight_bytes}-bit", (linear + dense) * s.weight_bytes)]


def _activations(a: Architecture, s: Setup, shapes: dict, targets) -> list[tuple[str, float]]:
    """What the forward pass keeps for the backward one, the packed rows' attention masks, the logits."""
    tokens = s.micro_batch * s.rows_per_example * s.seq_len
    kv = a.kv_heads * (a.hidden // a.heads)
    # bf16 tensors a decoder layer keeps for backward, per token: norm inputs and outputs, q/k/v,
    # attention output (flash/SDPA: no score matrix), gate, up, activation and product in the MLP.
    per_layer = (6 * a.hidden + 2 * kv + 4 * a.intermediate) * 2
    if s.finetune == "lora" and s.lora_dropout > 0:
        per_layer += sum(shapes[t][0] for t in targets) * 3  # dropped-out copy (bf16) and its mask per adapter
    if s.checkpointing:
        activations = tokens * (a.layers * a.hidden * 2 + per_layer)
        label = "activations: checkpointed (layer inputs + one layer recomputed)"
    else:
        activations = tokens * a.layers * per_layer
        label = "activations: every layer kept (no checkpointing)"
    # Padded micro batches reach micro_batch x seq_len tokens only with a full-length example; packed ones always do.
    batch = f"{s.micro_batch}{' packed rows' if s.packing else ''} x {s.seq_len} tokens"
    if s.rows_per_example > 1:
        batch = f"{s.micro_batch} pairs = {s.micro_batch * s.rows_per_example} rows (chosen, rejected) x {s.seq_len} " \
                "tokens"
    rows = [(f"{label}, {batch}", activations)]
    if s.packing:  # SDPA keeps packed sequences apart with a boolean block-diagonal mask per row; flash-attention: none
        rows.append((f"attention masks of the packed rows (SDPA; none with flash-attention 2): {s.micro_batch} x "
                     f"{s.seq_len}^2 bytes", s.micro_batch * s.seq_len * s.seq_len))
    logits_bytes = 4 if s.loss == "full" else 2 + 4 / 8
    rows.append((f"logits and loss: {a.vocab} vocabulary x {tokens} tokens", a.vocab * tokens * logits_bytes))
    return rows


def largest(a: Architecture, s: Setup, budget: float, field: str, step: int, limit: int) -> int:
    """The largest micro batch (or sequence length, in ``step``s) whose plan fits in ``budget``; 0 if none."""
    best, value = 0, step
    while value <= limit and estimate(a, replace(s, **{field: value})).total <= budget:
        best, value = value, value + step
    return best


@dataclass(frozen=True)
class RunPlan:
    """A run's memory plan, estimated once (:func:`plan_run`) and read by all that need it: the ``plan`` command's
    table, the out-of-memory check before the weights load."""

    model: str
    architecture: Architecture
    setup: Setup
    plan: Plan


def report(run: RunPlan, budget: float, recipe: str = "") -> tuple[str, bool]:
    """The breakdown table and the verdict; returns (text, fits)."""
    model, a, s, plan = run.model, run.architecture, run.setup, run.plan
    fits = plan.total <= budget
    lines = [f"memory plan{' for ' + recipe if recipe else ''}: {model} ({plan.parameters / 1e9:.2f}B parameters), "
             f"{s.gpus} GPU{'s' if s.gpus > 1 else ''} x {budget / GIB:.1f} GiB, micro batch {s.micro_batch} x "
             f"{s.seq_len} tokens{', FSDP' if s.fsdp else ''}",
             f"  {'component':<86}{'GiB per GPU':>12}"]
    lines += [f"  {label:<86}{size / GIB:>12.2f}" for label, size in plan.rows]
    verdict = "fits" if fits else "DOES NOT FIT"
    lines.append(f"  {'total':<86}{plan.total / GIB:>12.2f}   {verdict} in {budget / GIB:.1f} GiB "
                 f"({100 * plan.total / budget:.0f}%)")
    batch = largest(a, s, budget, "micro_batch", 1, 1024)
    seq = largest(a, s, budget, "seq_len", 128, 1 << 20)
    lines.append(f"  largest micro batch at {s.seq_len} tokens: {batch or 'none'}; "
                 f"longest sequence at micro batch {s.micro_batch}: {seq or 'none'} tokens")
    return "\n".join(lines), fits


def parse_memory(text: str) -> float:
    match = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|G|MiB|MB)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"key 'gpu_memory': {text!r} is not a size such as 24GB or 80GiB")
    # GPU makers' "24 GB" and "80 GB" are 24 and 80 GiB, so GB counts in GiB here.
    number, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
    return number * (GIB if unit in ("gib", "gb", "g") else 1024**2)


AUTO_CHECKPOINTING_SHARE = 0.7  # the plan is within about 20% of published peaks, either way (tests/test_plan.py)


def device_memory(device: str) -> float:
    """Bytes a run may use: the GPU's total memory, or on CPU the memory the system has available now."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)[1]) * 1024
    except (OSError, TypeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_run(cfg: TrainConfig, model: str, world_size: int, memory: float
             ) -> tuple[TrainConfig, str, RunPlan | None]:
    """The run's memory plan for ``model`` (a directory or a name; None without one), each configuration estimated
    once, and ``gradient_checkpointing=auto`` settled by it: off, and about a third less compute, when the plan
    without it stays under 70% of ``memory``; on otherwise, and when there is no plan. Returns the config with a
    boolean, why (for the log), and the plan."""
    setting, architecture = cfg.gradient_checkpointing, find_architecture(model)
    if architecture is None:
        why = "on (auto: no memory plan for it)" if setting == "auto" else f"{'on' if setting else 'off'} (set)"
        return replace(cfg, gradient_checkpointing=setting is not False), f"gradient checkpointing {why}", None
    setup = Setup.from_config(cfg, world_size)
    if setting != "auto":
        return cfg, f"gradient checkpointing {'on' if setting else 'off'} (set)", \
            RunPlan(model, architecture, setup, estimate(architecture, setup))
    without = estimate(architecture, replace(setup, checkpointing=False))
    off = without.total <= AUTO_CHECKPOINTING_SHARE * memory
    why = (f"gradient checkpointing {'off' if off else 'on'} (auto: the plan without it, {without.total / GIB:.1f} "
           f"GiB, is {'within' if off else 'over'} {AUTO_CHECKPOINTING_SHARE:.0%} of {memory / GIB:.1f} GiB)")
    setup = replace(setup, checkpointing=not off)
    return replace(cfg, gradient_checkpointing=not off), why, \
        RunPlan(model, architecture, setup, without if off else estimate(architecture, setup))


def check_memory(run: RunPlan | None, cfg: TrainConfig, gpu_bytes: float) -> None:
    """Stops before any weight loads when the run's plan predicts out-of-memory (``force=true`` overrides)."""
    if run is None:
        logger.info(f"memory plan skipped: no config for {cfg.model} and not a built-in architecture")
        return
    if run.plan.total <= gpu_bytes:
        return
    text, _ = report(run, gpu_bytes, cfg.recipe)
    if cfg.force:
        logger.warning("the memory plan predicts out-of-memory; going on because force=true\n" + text)
        return
    print(text, file=sys.stderr)
    raise ConfigError("the memory plan above predicts out-of-memory on this GPU: lower micro_batch_size or "
                      "max_length, turn on gradient_checkpointing, use more GPUs, or set force=true")


@dataclass
class PlanConfig(TrainConfig):
    gpus: int = key(1, "GPUs the run will have")
    gpu_memory: str = key("24GB", "memory per GPU, e.g. 24GB or 80GiB (GB counts as GPU makers count: GiB)")


def help_text() -> str:
    usage = "usage: alpaca-lora plan [recipe=NAME] model=NAME_OR_DIR [gpus=N] [gpu_memory=24GB] [key=value ...]"
    return "\n".join([usage,
                      __doc__.strip().split("\n\n", 1)[1], f"built-in architectures: {', '.join(ARCHITECTURES)}",
                      "keys (the training keys, plus gpus and gpu_memory):"] + key_lines(PlanConfig))


def load_plan_config(argv: list[str]) -> PlanConfig:
    cfg = load_config(argv, PlanConfig)
    if cfg.gpus < 1:
        raise ConfigError("key 'gpus' must be at least 1")
    parse_memory(cfg.gpu_memory)
    if find_architecture(cfg.model) is None:
        raise ConfigError(f"key 'model': no config.json at {cfg.model} and not a built-in architecture "
                          f"({', '.join(ARCHITECTURES)})")
    return cfg


def run(cfg: PlanConfig) -> int:
    cfg, why, planned = plan_run(cfg, cfg.model, cfg.gpus, parse_memory(cfg.gpu_memory))
    print(why)
    text, fits = report(planned, parse_memory(cfg.gpu_memory), cfg.recipe)
    print(text)
    return 0 if fits else 1


def main(argv: list[str] | None = None) -> int:
    return entry_point(argv, help_text, load_plan_config, run) or 0


if __name__ == "__main__":
    sys.exit(main())
