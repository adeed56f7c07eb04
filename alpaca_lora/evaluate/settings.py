"""The keys of ``python -m alpaca_lora.evaluate answer|judge|arena|arena report``, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alpaca_lora.endpoint.settings import EndpointSettings
from alpaca_lora.inference import Decoding, ModelSettings
from alpaca_lora.settings import ConfigError, build, key, parse_overrides

TOOL = "alpaca_lora.evaluate"
JUDGES = ("llm", "reference")


@dataclass
class AnswerConfig(ModelSettings, Decoding, EndpointSettings):
    set: Optional[str] = key(None, "self-instruct-252 (default; downloaded once) or its local path, an Alpaca-format "
                                   "source (.json/.jsonl, URL, builtin:NAME) or an AlpacaEval-format JSON")
    held_out: Optional[str] = key(None, "answer the items this training run (an adapter directory) held out "
                                        "for validation")
    limit: Optional[int] = key(None, "answer only the first N items")
    output: Optional[str] = key(None, "answers JSONL (default outputs/evaluate/GENERATOR.jsonl); its journal "
                                      "and the AlpacaEval form are written beside it")
    generator: Optional[str] = key(None, "the name the answers go by (default: the adapter's, model's or "
                                         "served model's name)")
    batch_size: int = key(8, "prompts per batch with a local model")
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


@dataclass
class ArenaConfig:
    a: Optional[str] = key(None, "answers A (as judge takes them)")
    b: Optional[str] = key(None, "answers B")
    db: str = key("arena.sqlite", "SQLite database of the votes; several arenas may share one")
    host: str = key("127.0.0.1", "interface to bind (0.0.0.0 exposes the page to the network)")
    port: int = key(7861, "port")
    share: bool = key(False, "also publish a temporary public gradio.live link")
    auth_env: Optional[str] = key(None, "name of an environment variable holding user:password for basic auth")


@dataclass
class ArenaReportConfig:
    db: Optional[str] = key(None, "the arena's SQLite database")
    judgments: Optional[str] = key(None, "a judge's judgments.jsonl: agreement between the voters and the judge")
    output_dir: Optional[str] = key(None, "where arena_report.json, the PNG and votes.csv go (default: DB-report "
                                          "beside the database)")


def load_settings(schema: type, argv: list[str], tool: str):
    cfg = build(schema, [("command line", parse_overrides(argv))], tool)
    for name in ("a", "b", "db"):
        if hasattr(cfg, name) and not getattr(cfg, name):
            raise ConfigError(f"key '{name}' must be set")
    if isinstance(cfg, EndpointSettings):
        cfg.check_endpoint_settings()
    if isinstance(cfg, AnswerConfig):
        check_answer_config(cfg)
    if isinstance(cfg, JudgeConfig):
        check_judge_config(cfg)
    if isinstance(cfg, ArenaReportConfig) and not Path(cfg.db).is_file():
        raise ConfigError(f"key 'db': {cfg.db}: no such database")
    return cfg


def check_answer_config(cfg: AnswerConfig) -> None:
    cfg.validate()
    checks = [
        (cfg.limit is None or cfg.limit >= 1, "limit", "must be at least 1"),
        (cfg.batch_size >= 1, "batch_size", "must be at least 1"),
        (cfg.api in ("chat", "completions"), "api", "must be chat or completions"),
        (bool(cfg.model) or bool(cfg.adapter), "model", "must be set (a local model, or with base_url the served "
                                                        "model's name), or adapter="),
    ]
    if cfg.uses_endpoint:
        checks += [
            (not cfg.adapter, "adapter", "cannot be used with base_url (the server has its model loaded)"),
            (cfg.decoding != "beam", "decoding", "beam needs a local model (OpenAI endpoints sample or are greedy)"),
            (cfg.top_k is None, "top_k", "has no OpenAI request field; leave it unset with base_url"),
            (cfg.repetition_penalty is None, "repetition_penalty", "has no OpenAI request field; leave it unset "
                                                                  "with base_url"),
        ]
    for ok, name, message in checks:
        if not ok:
            raise ConfigError(f"key '{name}' {message}")


def check_judge_config(cfg: JudgeConfig) -> None:
    if cfg.judge not in JUDGES:
        raise ConfigError(f"key 'judge' must be one of {', '.join(JUDGES)}")
    if cfg.judge == "llm" and not cfg.judge_model:
        raise ConfigError("key 'judge_model' must be set (the judge model's name), or judge=reference")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise ConfigError("key 'max_tokens' must be at least 1")
