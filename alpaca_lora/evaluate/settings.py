"""The keys of ``alpaca-lora evaluate answer|judge|harness``, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alpaca_lora.common.settings import build, check, command_line, key
from alpaca_lora.endpoint.settings import EndpointSettings
from alpaca_lora.inference.generation import Decoding
from alpaca_lora.inference.loading import InferenceModel, load_inference_settings

TOOL = "evaluate"
JUDGES = ("llm", "reference")


@dataclass
class AnswerConfig(InferenceModel, Decoding, EndpointSettings):
    set: Optional[str] = key(None, "self-instruct-252 (default; downloaded once) or its local path, an Alpaca-format "
                                   "source (.json/.jsonl, URL, builtin:NAME) or an AlpacaEval-format JSON")
    held_out: Optional[str] = key(None, "answer the items this training run (an adapter directory) held out "
                                        "for validation")
    limit: Optional[int] = key(None, "answer only the first N items")
    output: Optional[str] = key(None, "answers JSONL (default outputs/evaluate/GENERATOR.jsonl); its journal "
                                      "and the AlpacaEval form are written beside it")
    generator: Optional[str] = key(None, "the name the answers go by (default: the adapter's, model's or "
                                         "served model's name)")
    batch_size: int = key(8, "answers a local model generates together (its engine's max_batch)")
    api: str = key("chat", "with base_url: chat (instruction and input in one user message) or completions "
                           "(the prompt template, see template)")
    system: Optional[str] = key(None, "with base_url and api=chat: a system message sent before each instruction")

    @property
    def uses_endpoint(self) -> bool:
        return self.base_url is not None


@dataclass
class JudgeConfig(EndpointSettings):
    a: Optional[str] = key(None, "answers A: a file written by answer, AlpacaEval's model_outputs, Self-Instruct "
                                 "predictions, or a published name such as text-davinci-003")
    b: Optional[str] = key(None, "answers B, as a")
    judge: str = key("llm", "llm (judge_model through an OpenAI-compatible endpoint) or reference (exact match "
                            "with the set's reference answers; offline, free)")
    judge_model: Optional[str] = key(None, "the judge model's name at the endpoint (judge=llm)")
    output_dir: Optional[str] = key(None, "report.json, report.png, judgments.jsonl and the judge's journal "
                                          "(default outputs/evaluate/A_vs_B)")
    temperature: Optional[float] = key(0.0, "the judge's sampling temperature (MT-Bench: 0); null to leave it "
                                            "to the server")
    max_tokens: Optional[int] = key(2048, "completion token limit of a judgment; null for none")
    shared_cache: bool = key(True, "reuse and keep judgments in the user's judgment cache (ALPACA_LORA_CACHE/judge), "
                                   "across output directories; false: this output_dir's journal only")
    max_unparseable: float = key(0.1, "share of judgments that may end without a verdict (scored as ties); past "
                                      "it the run warns and exits with code 4")


def load_answer_config(argv: list[str]) -> AnswerConfig:
    """An adapter's (or a model directory's) saved model section first, as ``generate`` reads it."""
    cfg: AnswerConfig = load_inference_settings(AnswerConfig, argv, f"{TOOL} answer")
    cfg.validate()
    endpoint = cfg.uses_endpoint
    check(cfg.endpoint_checks() + [
        (cfg.limit is None or cfg.limit >= 1, "limit", "must be at least 1"),
        (cfg.batch_size >= 1, "batch_size", "must be at least 1"),
        (cfg.api in ("chat", "completions"), "api", "must be chat or completions"),
        (bool(cfg.model), "model", "must be set (a local model, or with base_url the served model's name), "
                                   "or adapter="),
        (not endpoint or not cfg.adapter, "adapter", "cannot be used with base_url (the server has its model loaded)"),
        (not endpoint or cfg.decoding != "beam", "decoding", "beam needs a local model (OpenAI endpoints sample or "
                                                             "are greedy)"),
        (not endpoint or cfg.top_k is None, "top_k", "has no OpenAI request field; leave it unset with base_url"),
        (not endpoint or cfg.repetition_penalty is None, "repetition_penalty", "has no OpenAI request field; leave "
                                                                               "it unset with base_url"),
    ])
    return cfg


def load_judge_config(argv: list[str]) -> JudgeConfig:
    cfg = build(JudgeConfig, [command_line(argv, JudgeConfig)], f"{TOOL} judge")
    check(cfg.endpoint_checks() + [
        (bool(cfg.a), "a", "must be set"),
        (bool(cfg.b), "b", "must be set"),
        (cfg.judge in JUDGES, "judge", f"must be one of {', '.join(JUDGES)}"),
        (cfg.judge != "llm" or bool(cfg.judge_model), "judge_model", "must be set (the judge model's name), or "
                                                                     "judge=reference"),
        (cfg.max_tokens is None or cfg.max_tokens >= 1, "max_tokens", "must be at least 1"),
        (0 <= cfg.max_unparseable <= 1, "max_unparseable", "must be a share between 0 and 1"),
    ])
    return cfg


@dataclass
class HarnessConfig(InferenceModel):
    tasks: Optional[str] = key(None, "lm-evaluation-harness tasks, comma-separated: names (arc_easy,hellaswag; "
                                     "`lm_eval ls tasks` lists them), task YAML files, or directories of them")
    limit: Optional[float] = key(None, "at most N documents per task (below 1: that share of each); for a quick "
                                       "look, not for numbers to report")
    num_fewshot: Optional[int] = key(None, "examples in each prompt (default: each task's own)")
    batch_size: int = key(8, "requests lm-eval scores or generates together (a number: its 'auto' probes for "
                             "running out of GPU memory)")
    compare_base: bool = key(False, "also evaluate the base with the adapter disabled (the same loaded model): "
                                    "what fine-tuning changed")
    chat_template: Optional[bool] = key(None, "wrap each task prompt in the tokenizer's chat template (an adapter's "
                                              "is its training template), as lm-eval's --apply_chat_template; "
                                              "default: when the tokenizer has one")
    output_dir: Optional[str] = key(None, "report.json, report.md and samples_RUN.jsonl (default "
                                          "outputs/evaluate/harness/NAME)")

    def task_entries(self) -> list[str]:
        return [entry.strip() for entry in (self.tasks or "").split(",") if entry.strip()]


def looks_like_path(entry: str) -> bool:
    """A task entry that names a file or directory rather than a registered task."""
    return "/" in entry or entry.endswith((".yaml", ".yml")) or Path(entry).expanduser().exists()


def load_harness_config(argv: list[str]) -> HarnessConfig:
    """An adapter's saved model section first (its base, bits and template), as ``generate`` reads it."""
    cfg: HarnessConfig = load_inference_settings(HarnessConfig, argv, f"{TOOL} harness")
    missing = [e for e in cfg.task_entries() if looks_like_path(e) and not Path(e).expanduser().exists()]
    check([
        (bool(cfg.task_entries()), "tasks", "must be set (task names, YAML files or directories, comma-separated)"),
        (bool(cfg.model), "model", "must be set (a local model or hub id), or adapter="),
        (cfg.limit is None or cfg.limit > 0, "limit", "must be positive"),
        (cfg.num_fewshot is None or cfg.num_fewshot >= 0, "num_fewshot", "must be 0 or more"),
        (cfg.batch_size >= 1, "batch_size", "must be at least 1"),
        (not cfg.compare_base or bool(cfg.adapter), "compare_base", "needs adapter= (the base is the adapter's, "
                                                                    "disabled in the same loaded model)"),
    ] + [(False, "tasks", f": {entry}: no such file or directory") for entry in missing])
    return cfg
