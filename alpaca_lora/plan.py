"""Will it fit? ``python -m alpaca_lora.plan recipe=NAME model=NAME_OR_DIR [gpus=N] [gpu_memory=24GB] [key=value ...]``

Peak GPU memory per device, estimated from the model's shape alone (a local config.json, or a
built-in table of common architectures), before any weights load: weights at their storage
precision (with quantization constants), trainable parameters, gradients, optimizer states,
activations (with or without gradient checkpointing), the logits and loss buffer, FSDP sharding
and a fixed runtime overhead. ``train`` runs the same plan and stops before loading weights when
it predicts out-of-memory (``force=true`` to go on).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

GIB = 1024**3
OVERHEAD_BYTES = int(0.5 * GIB)  # CUDA context, cuBLAS workspace, allocator slack
NF4_BLOCK = 64  # bitsandbytes 4-bit block size; an fp32 absmax per block
DOUBLE_QUANT_BLOCK = 256  # double quantization: 8-bit absmax, an fp32 constant per 256 blocks


@dataclass(frozen=True)
class Architecture:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    layer_class: str = "LlamaDecoderLayer"


_LLAMA1 = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40), "30b": (6656, 17920, 60, 52),
           "33b": (6656, 17920, 60, 52), "65b": (8192, 22016, 80, 64)}
ARCHITECTURES: dict[str, Architecture] = {
    **{f"llama-{size}": Architecture(h, i, n, a, a, 32000) for size, (h, i, n, a) in _LLAMA1.items()},
    "llama-2-7b": Architecture(4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": Architecture(5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": Architecture(8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": Architecture(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": Architecture(8192, 28672, 80, 64, 8, 128256),
    "llama-3.1-8b": Architecture(4096, 14336, 32, 32, 8, 128256),
    "llama-3.1-70b": Architecture(8192, 28672, 80, 64, 8, 128256),
    "mistral-7b": Architecture(4096, 14336, 32, 32, 8, 32000, layer_class="MistralDecoderLayer"),
    **{f"qwen2.5-{size}": Architecture(h, i, n, a, kv, v, tied, "Qwen2DecoderLayer") for size, (h, i, n, a, kv, v, tied) in {
        "0.5b": (896, 4864, 24, 14, 2, 151936, True), "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
        "3b": (2048, 11008, 36, 16, 2, 151936, True), "7b": (3584, 18944, 28, 28, 4, 152064, False),
        "14b": (5120, 13824, 48, 40, 8, 152064, False), "32b": (5120, 27648, 64, 40, 8, 152064, False),
        "72b": (8192, 29568, 80, 64, 8, 152064, False)}.items()},
    "smollm2-135m": Architecture(576, 1536, 30, 9, 3, 49152, True),
    "smollm2-360m": Architecture(960, 2560, 32, 15, 5, 49152, True),
    "smollm2-1.7b": Architecture(2048, 8192, 24, 32, 32, 49152, True),
}


def find_architecture(model: str) -> Architecture | None:
    """From a local config.json (file or directory), else the table by name: ``llama-2-7b``,
    ``meta-llama/Llama-2-7b-hf``, ``huggyllama/llama-7b``, ``Qwen/Qwen2.5-7B-Instruct`` ..."""
    path = Path(model).expanduser()
    config = path / "config.json" if path.is_dir() else path
    if config.is_file() and config.suffix == ".json":
        c = json.loads(config.read_text())
        heads = c["num_attention_heads"]
        return Architecture(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], heads,
                            c.get("num_key_value_heads") or heads, c["vocab_size"], bool(c.get("tie_word_embeddings")),
                            f"{(c.get('architectures') or ['LlamaForCausalLM'])[0].removesuffix('ForCausalLM')}DecoderLayer")
    name = model.rsplit("/", 1)[-1].lower().replace("meta-llama-", "llama-").replace("_", "-")
    name = re.sub(r"-(hf|instruct|chat|base|v0\.\d|v\d)$", "", re.sub(r"-(hf|instruct|chat)(-hf)?$", "", name))
    return ARCHITECTURES.get(name) or next(
        (arch for key, arch in sorted(ARCHITECTURES.items(), key=lambda kv: -len(kv[0])) if name.startswith(key + "-")), None)


@dataclass(frozen=True)
class Setup:
    """What the plan needs to know about a run; the training config maps onto it (``from_config``)."""

    finetune: str = "lora"            # lora or full
    bits: int = 4                     # storage of the frozen base: 4, 8 or 16
    double_quant: bool = True
    weight_bytes: int = 2             # bytes per parameter of 16-bit weights (4: fp32 master weights)
    lora_r: int = 64
    lora_targets: tuple = ("all-linear",)
    lora_dropout: float = 0.0
    adapter_bytes: int = 4            # LoRA weights, and their gradients, in fp32
    optimizer: str = "adamw"          # adamw (32-bit states), adamw_8bit, sgd
    micro_batch: int = 4
    seq_len: int = 512
    checkpointing: bool = True
    loss: str = "full"                # full: fp32 logits for every position; chunked: bf16 logits, fp32 per chunk
    gpus: int = 1
    fsdp: bool = False

    @classmethod
    def from_config(cls, cfg, gpus: int) -> Setup:
        optim = cfg.optim.lower()
        return cls(finetune=cfg.finetune, bits=cfg.quant.bits, double_quant=cfg.quant.double_quant,
                   weight_bytes=4 if cfg.finetune == "full" else 2, lora_r=cfg.lora.r,
                   lora_targets=tuple(cfg.lora.target_modules), lora_dropout=cfg.lora.dropout,
                   optimizer="adamw_8bit" if "8bit" in optim else "sgd" if optim.startswith("sgd") else "adamw",
                   micro_batch=cfg.micro_batch_size, seq_len=cfg.max_length,
                   checkpointing=cfg.gradient_checkpointing, gpus=gpus, fsdp=bool(cfg.fsdp) and gpus > 1)


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
    shapes = _linear_shapes(a)
    linear = a.layers * sum(i * o for i, o in shapes.values())
    embeddings = a.vocab * a.hidden * (1 if a.tied else 2)
    norms = a.hidden * (2 * a.layers + 1)
    parameters = linear + embeddings + norms
    shard = s.gpus if s.fsdp else 1

    if s.bits == 4:
        constants = 4 / NF4_BLOCK if not s.double_quant else 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)
        frozen = [(f"weights: {linear / 1e9:.2f}B in 4-bit NF4 + quantization constants", linear * (0.5 + constants)),
                  (f"weights: {(embeddings + norms) / 1e9:.2f}B embeddings and norms in 16-bit", (embeddings + norms) * 2)]
    elif s.bits == 8:
        frozen = [(f"weights: {linear / 1e9:.2f}B in 8-bit + row scales", linear * 1.0 + a.layers * sum(o for _, o in shapes.values()) * 4),
                  (f"weights: {(embeddings + norms) / 1e9:.2f}B embeddings and norms in 16-bit", (embeddings + norms) * 2)]
    else:
        frozen = [(f"weights: {parameters / 1e9:.2f}B in {8 * s.weight_bytes}-bit", parameters * s.weight_bytes)]

    if s.finetune == "full":
        trainable = parameters
        rows = [(label, size / shard) for label, size in frozen]
        grad_bytes = s.weight_bytes
    else:
        targets = _LINEARS if "all-linear" in s.lora_targets else [t for t in _LINEARS if t in s.lora_targets]
        trainable = a.layers * sum(s.lora_r * (shapes[t][0] + shapes[t][1]) for t in targets)
        rows = [(label, size / shard) for label, size in frozen]
        rows.append((f"trainable: LoRA r{s.lora_r} on {len(targets)} projections, {trainable / 1e6:.1f}M parameters",
                     trainable * s.adapter_bytes / shard))
        grad_bytes = s.adapter_bytes
    rows.append(("gradients", trainable * grad_bytes / shard))
    optimizer_bytes = {"adamw": 8, "adamw_8bit": 2, "sgd": 0}[s.optimizer]
    rows.append((f"optimizer states ({s.optimizer}, {optimizer_bytes} bytes per trainable parameter)",
                 trainable * optimizer_bytes / shard))

    tokens = s.micro_batch * s.seq_len
    kv = a.kv_heads * (a.hidden // a.heads)
    # bf16 tensors a decoder layer keeps for backward, per token: norm inputs and outputs, q/k/v,
    # attention output (flash/SDPA: no score matrix), gate, up, activation and product in the MLP.
    per_layer = (6 * a.hidden + 2 * kv + 4 * a.intermediate) * 2
    if s.finetune == "lora" and s.lora_dropout > 0:
        targets = _LINEARS if "all-linear" in s.lora_targets else [t for t in _LINEARS if t in s.lora_targets]
        per_layer += sum(shapes[t][0] for t in targets) * 3  # dropped-out copy (bf16) and its mask per adapter
    if s.checkpointing:
        activations = tokens * (a.layers * a.hidden * 2 + per_layer)
        label = "activations: checkpointed (layer inputs + one layer recomputed)"
    else:
        activations = tokens * a.layers * per_layer
        label = "activations: every layer kept (no checkpointing)"
    rows.append((f"{label}, {s.micro_batch} x {s.seq_len} tokens", activations))
    logits_bytes = 4 if s.loss == "full" else 2 + 4 / 8
    rows.append((f"logits and loss: {a.vocab} vocabulary x {tokens} tokens", a.vocab * tokens * logits_bytes))
    if s.fsdp:
        layer_params = sum(i * o for i, o in shapes.values())
        per_param = {4: 0.5 + 1 / NF4_BLOCK, 8: 1.0}.get(s.bits, s.weight_bytes)
        rows.append((f"FSDP: 2 decoder layers gathered unsharded ({s.gpus}-way sharding above)",
                     2 * layer_params * per_param))
    rows.append(("runtime overhead (CUDA context, workspaces, allocator)", OVERHEAD_BYTES))
    return Plan(rows, parameters, trainable)


def largest(a: Architecture, s: Setup, budget: float, field: str, step: int, limit: int) -> int:
    """The largest micro batch (or sequence length, in ``step``s) whose plan fits in ``budget``; 0 if none."""
    best, value = 0, step
    while value <= limit and estimate(a, replace(s, **{field: value})).total <= budget:
        best, value = value, value + step
    return best


def report(model: str, a: Architecture, s: Setup, budget: float, recipe: str = "") -> tuple[str, bool]:
    """The breakdown table and the verdict; returns (text, fits)."""
    plan = estimate(a, s)
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
        from alpaca_lora.settings import ConfigError

        raise ConfigError(f"key 'gpu_memory': {text!r} is not a size such as 24GB or 80GiB")
    # GPU makers' "24 GB" and "80 GB" are 24 and 80 GiB, so GB counts in GiB here.
    number, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
    return number * (GIB if unit in ("gib", "gb", "g") else 1024**2)


def main(argv: list[str] | None = None) -> int:
    from alpaca_lora.config import load_config
    from alpaca_lora.errors import exit_on_user_error
    from alpaca_lora.settings import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip())
        print(f"\nbuilt-in architectures: {', '.join(ARCHITECTURES)}")
        return 0
    with exit_on_user_error():
        own = {k: v for k, v in (item.split("=", 1) for item in argv if item.startswith(("gpus=", "gpu_memory=")))}
        cfg = load_config([item for item in argv if not item.startswith(("gpus=", "gpu_memory="))])
        gpus = int(own.get("gpus", 1))
        if gpus < 1:
            raise ConfigError("key 'gpus' must be at least 1")
        budget = parse_memory(own.get("gpu_memory", "24GB"))
        architecture = find_architecture(cfg.model)
        if architecture is None:
            raise ConfigError(f"key 'model': no config.json at {cfg.model} and not a built-in architecture "
                              f"({', '.join(ARCHITECTURES)})")
        text, fits = report(cfg.model, architecture, Setup.from_config(cfg, gpus), budget, cfg.recipe)
        print(text)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
