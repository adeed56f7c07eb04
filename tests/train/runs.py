"""What the training tests share: records the tiny model fits quickly, the key=value arguments of a tiny run, and a
callback that records the optimizer steps taken."""

from __future__ import annotations

import json

from transformers import TrainerCallback

from alpaca_lora.data.builtin import WORDS

# Distinct records the tiny model can fit quickly: the word lists repeat, so the loss must fall.
RECORDS = [
    {"instruction": "Reverse the order of the words.", "input": " ".join(WORDS[i : i + 3]),
     "output": " ".join(reversed(WORDS[i : i + 3]))}
    for i in range(0, 24)
]


def tiny_run(model_dir, tmp_path, *overrides, records=RECORDS):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    return [
        "recipe=qlora", f"model={model_dir}", f"data={data}", f"output_dir={tmp_path / 'out'}",
        "device=cpu", "micro_batch_size=4", "batch_size=4", "max_length=64", "learning_rate=1e-2",
        "warmup=0", "logging_steps=1", "report_to=[]", "gradient_checkpointing=false",
        "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "val_set_size=0", *overrides,
    ]


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def saved_adapter(directory, model: str = "huggyllama/llama-7b", template: str = "alpaca", r: int = 64):
    """A directory shaped like an SFT adapter (its training_config.yaml and adapter_config.json, no weights): what a
    preference run's configuration reads from the adapter it tunes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "training_config.yaml").write_text(
        f"config:\n  model: {model}\n  template: {template}\n  quant:\n    bits: 4\n    quant_type: nf4\n"
        "    double_quant: true\n    compute_dtype: bfloat16\n")
    (directory / "adapter_config.json").write_text(json.dumps({
        "r": r, "lora_alpha": 16, "lora_dropout": 0.05, "peft_type": "LORA",
        "target_modules": ["v_proj", "q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
    return directory
