"""Preference tuning (``method=dpo`` or ``kto``): TRL's DPOTrainer and KTOTrainer on an SFT adapter, as SFT runs.

The data (``feedback export`` writes it) is TRL's: ``prompt``/``chosen``/``rejected`` pairs for DPO,
``prompt``/``completion``/``label`` rows for KTO (a paired file is unpaired for KTO as TRL does: chosen is
desirable, rejected undesirable). Every record is checked, with one line naming the file, the record and the
field, before any model loads; a record that also carries its ``instruction`` and ``input`` must have the prompt
the adapter's template renders from them (data exported for another template would teach the wrong format).

Tokenized here, as SFT tokenizes (``data.examples``): the prompt alone with ``encode_prompt`` (BOS, never EOS),
each answer without special tokens and then EOS, over-long answers cut (``truncation``) exactly as SFT cuts
them, and given to TRL pre-tokenized. TRL's own string path would tokenize prompt and answer as one string,
which for SentencePiece tokenizers (LLaMA) drops the word-start mark SFT trained after ``### Response:``.

The model is the adapter's base, quantized as it was trained, with the SFT adapter loaded as the trainable
``default`` adapter. TRL copies it into a frozen ``ref`` adapter on the same base: the reference policy is the
SFT policy, without a second copy of the base. TRL then casts the trainable copy of a quantized model's adapter
to bf16; ``start_from_reference`` puts the exact SFT weights back (in the compute dtype), so that policy and
reference agree at step 0 (the DPO loss starts at ln 2). Saving writes only the trained adapter (checkpoints
too), an ordinary adapter directory that generate, serve, merge and another preference run load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from trl import DPOTrainer, KTOTrainer

from alpaca_lora.common.errors import DataError
from alpaca_lora.data.examples import encode_prompt
from alpaca_lora.data.templates import PromptTemplate
from alpaca_lora.evaluate.sets import read_json_records, text_field


def load_preferences(path: str, method: str, template: PromptTemplate) -> list[dict]:
    """The records of a local .jsonl (or .json list) file, each checked; for KTO, pairs unpaired."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{path}: no such file (preference data is a local .jsonl or .json file, such as "
                        "alpaca-lora feedback export writes)")
    records = []
    for where, record in read_json_records(file, path):
        records += check_record(record, where, path, method, template)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def check_record(record: object, where: str, label: str, method: str, template: PromptTemplate) -> list[dict]:
    """One record as training rows (one, or two for a pair unpaired for KTO); a bad one is one clear line."""
    prompt = _text(record, "prompt", where, label)
    if isinstance(record.get("instruction"), str) and prompt != template.format(record["instruction"],
                                                                                record.get("input") or ""):
        raise DataError(f"{label}: {where}: field 'prompt' is not its instruction and input in the adapter's template "
                        f"({template.name}); export the votes with adapter= the adapter being tuned")
    paired = "chosen" in record or "rejected" in record
    if method == "dpo" or paired:
        chosen, rejected = _text(record, "chosen", where, label), _text(record, "rejected", where, label)
        if chosen.strip() == rejected.strip():
            raise DataError(f"{label}: {where}: fields 'chosen' and 'rejected' are the same answer: no preference")
        if method == "dpo":
            return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
        return [{"prompt": prompt, "completion": chosen, "label": True},
                {"prompt": prompt, "completion": rejected, "label": False}]
    completion = _text(record, "completion", where, label)
    if not isinstance(record.get("label"), bool):
        found = "it is missing" if record.get("label") is None else f"found {record['label']!r}"
        raise DataError(f"{label}: {where}: field 'label' must be true (a desirable answer) or false ({found})")
    return [{"prompt": prompt, "completion": completion, "label": record["label"]}]


def _text(record: object, name: str, where: str, label: str) -> str:
    value = text_field(record, name, where, label)
    if not value.strip():
        raise DataError(f"{label}: {where}: field '{name}' is empty")
    return value


@dataclass
class PreferenceSummary:
    """What the preference data became: rows kept, cut and dropped at ``max_length``, and the lengths."""

    method: str
    records: int
    rows: int
    desirable: int
    truncated: int
    dropped_too_long: int
    dropped_prompt_too_long: int
    length_p50: int
    length_max: int
    max_length: int
    truncation: str

    def lines(self) -> list[str]:
        kind = "pairs" if self.method == "dpo" else "answers"
        lines = [f"{self.records} {kind}; tokens per {kind[:-1]} (prompt and its longest answer): "
                 f"p50 {self.length_p50}, max {self.length_max}",
                 f"at max_length={self.max_length}: {self.truncated} answers truncated, {self.dropped_too_long} "
                 f"{kind} dropped as too long (truncation={self.truncation}), {self.dropped_prompt_too_long} "
                 "dropped (prompt alone too long)"]
        if self.method == "kto":
            undesirable = self.rows - self.desirable
            lines.append(f"{self.desirable} desirable, {undesirable} undesirable answers"
                         + (f" (the KTO paper's balance, arXiv:2402.01306 Eq. 8: preference.desirable_weight "
                            f"{undesirable / self.desirable:.2f} to {undesirable / self.desirable * 4 / 3:.2f})"
                            if self.desirable and undesirable and self.desirable != undesirable else ""))
        return lines

    def to_dict(self) -> dict:
        return asdict(self)


class Fitter:
    """Answers fitted after their prompt within ``max_length`` exactly as ``data.examples.tokenize_records`` fits
    SFT responses (``cut``: no EOS after a cut; ``cut_eos``; ``drop``), counting what it cuts and drops."""

    def __init__(self, tokenizer, max_length: int, truncation: str):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token: set one, or the model never learns to stop")
        self.tokenizer, self.max_length, self.truncation = tokenizer, max_length, truncation
        self.truncated = self.dropped_too_long = self.dropped_prompt = 0

    def fit(self, prompt: list[int], responses: list[list[int]]) -> list[list[int]] | None:
        """The answers' ids (EOS-ended unless cut), or None when one does not fit and the row must go."""
        room = self.max_length - len(prompt)
        if room < 1 or (self.truncation == "cut_eos" and room < 2):
            self.dropped_prompt += 1
            return None
        fitted, cut = [], 0
        for response in responses:
            completion = response + [self.tokenizer.eos_token_id]
            if len(completion) > room:
                if self.truncation == "drop":
                    self.dropped_too_long += 1
                    return None
                cut += 1
                completion = response[: room - 1] + completion[-1:] if self.truncation == "cut_eos" else \
                    response[:room]
            fitted.append(completion)
        self.truncated += cut
        return fitted


def tokenize_preferences(records: list[dict], method: str, tokenizer, max_length: int,
                         truncation: str) -> tuple[datasets.Dataset, PreferenceSummary, list[int]]:
    """Pre-tokenized rows for TRL (DPO: prompt_ids, chosen_ids, rejected_ids; KTO: prompt_ids, completion_ids,
    label), their summary, and each row's longest sequence (for the batch plan)."""
    fitter, prompts = Fitter(tokenizer, max_length, truncation), {}
    fields = ("chosen", "rejected") if method == "dpo" else ("completion",)
    rows: dict[str, list] = {"prompt_ids": [], **{f"{name}_ids": [] for name in fields}}
    rows.update({"label": []} if method == "kto" else {})
    lengths, full = [], []
    for record in records:
        if record["prompt"] not in prompts:
            prompts[record["prompt"]] = encode_prompt(tokenizer, record["prompt"])
        prompt = prompts[record["prompt"]]
        responses = tokenizer([record[name] for name in fields], add_special_tokens=False)["input_ids"]
        full.append(len(prompt) + max(map(len, responses)) + 1)
        answers = fitter.fit(prompt, responses)
        if answers is None:
            continue
        rows["prompt_ids"].append(prompt)
        for name, ids in zip(fields, answers):
            rows[f"{name}_ids"].append(ids)
        if method == "kto":
            rows["label"].append(record["label"])
        lengths.append(len(prompt) + max(map(len, answers)))
    measured = np.asarray(full or [0])
    summary = PreferenceSummary(method, len(records), len(lengths), sum(rows.get("label", [])), fitter.truncated,
                                fitter.dropped_too_long, fitter.dropped_prompt, int(np.percentile(measured, 50)),
                                int(measured.max()), max_length, truncation)
    return datasets.Dataset.from_dict(rows), summary, lengths


class OneAdapter:
    """Saves only the trained adapter (``default``) where TRL would also write its frozen ``ref`` copy: the output
    directory and every checkpoint are ordinary adapter directories. A resumed run rebuilds ``ref`` from the SFT
    adapter, as the first run did, and the trainer loads ``default`` from the checkpoint."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, selected_adapters=["default"])
        self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, Path(output_dir) / "training_args.bin")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Rows tokenized here (``tokenize_preferences``) go to TRL as they are; anything else TRL prepares."""
        if "prompt_ids" not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return self._pretokenized(dataset, args)

    def _pretokenized(self, dataset, args):
        return dataset


class PreferenceDPOTrainer(OneAdapter, DPOTrainer):
    pass


class PreferenceKTOTrainer(OneAdapter, KTOTrainer):
    def _pretokenized(self, dataset, args):
        """TRL's KL completions: within each micro batch, every prompt with the previous row's answer
        (``KTOTrainer._prepare_dataset`` does the same to the rows it tokenizes)."""
        if not self.calculate_KL:
            return dataset

        def rotate(batch):
            batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
            return batch

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)


TRAINERS = {"dpo": PreferenceDPOTrainer, "kto": PreferenceKTOTrainer}


def attach_adapter(model, adapter: str):
    """The SFT adapter on the base, trainable, under peft's ``default`` name (TRL copies that one to ``ref``)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def start_from_reference(model, compute_dtype: str) -> None:
    """The trainable adapter set to the frozen reference's exact weights, both in the compute dtype (float32 on
    CPU; bf16 on GPU, TRL's QLoRA choice): TRL's bf16 cast of the trainable copy alone would start the policy
    away from the reference."""
    dtype = torch.float32 if compute_dtype == "float32" else torch.bfloat16
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".ref." in name:
                parameter.data = parameter.data.to(dtype)
        for name, parameter in model.named_parameters():
            if ".default." in name:
                parameter.data = model.get_parameter(name.replace(".default.", ".ref.")).data.clone()
