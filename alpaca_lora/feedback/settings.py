"""The keys of ``alpaca-lora feedback export``, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alpaca_lora.common.errors import UserError
from alpaca_lora.common.settings import build, check, command_line, key
from alpaca_lora.model_args import saved_config

TOOL = "feedback"


@dataclass
class ExportConfig:
    feedback_db: Optional[str] = key(None, "the app's votes (alpaca-lora app feedback_db=FILE)")
    arena_db: Optional[str] = key(None, "the arena's votes (alpaca-lora arena db=FILE)")
    adapter: Optional[str] = key(None, "the adapter to tune: its prompts are rendered in the template it was trained "
                                       "with (its training_config.yaml)")
    template: Optional[str] = key(None, "the prompt template, when no adapter= names it (default alpaca)")
    output_dir: str = key("outputs/feedback", "where dpo.jsonl, kto.jsonl and summary.json go")
    pair_ratings: bool = key(True, "also pair, for one prompt, an answer voted up with one voted down (DPO pairs "
                                   "from ratings where no comparison covers the two)")


def load_export_config(argv: list[str]) -> ExportConfig:
    from alpaca_lora.data.templates import get_template

    cfg = build(ExportConfig, [command_line(argv, ExportConfig)], f"{TOOL} export")
    checks = [(bool(cfg.feedback_db or cfg.arena_db), "feedback_db", "or arena_db must be set (the votes to export)")]
    checks += [(not path or Path(path).is_file(), name, f": {path}: no such database")
               for name, path in (("feedback_db", cfg.feedback_db), ("arena_db", cfg.arena_db))]
    if cfg.adapter:
        trained = saved_config(cfg.adapter) if Path(cfg.adapter).is_dir() else {}
        checks.append((bool(trained.get("template")), "adapter",
                       f": {cfg.adapter}: no training_config.yaml of a training run there"))
        if cfg.template is None and trained.get("template"):
            cfg.template = trained["template"]
        checks.append((cfg.template == trained.get("template", cfg.template), "template",
                       f": {cfg.template} is not the template {cfg.adapter} was trained with "
                       f"({trained.get('template')}); leave template= out"))
    cfg.template = cfg.template or "alpaca"
    try:
        get_template(cfg.template)
    except UserError as exc:
        checks.append((False, "template", f": {exc}"))
    check(checks)
    return cfg
