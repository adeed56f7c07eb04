"""The keys of ``alpaca-lora arena`` and ``alpaca-lora arena report``, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alpaca_lora.common.settings import build, check, command_line, key

ARENA = "arena"
DB = "outputs/arena/arena.sqlite"  # under outputs/, like every stage's outputs


@dataclass
class ArenaConfig:
    a: Optional[str] = key(None, "answers A (as judge takes them)")
    b: Optional[str] = key(None, "answers B")
    db: str = key(DB, "SQLite database of the votes; several arenas may share one")
    host: str = key("127.0.0.1", "interface to bind (0.0.0.0 exposes the page to the network)")
    port: int = key(7861, "port")
    share: bool = key(False, "also publish a temporary public gradio.live link")
    auth_env: Optional[str] = key(None, "name of an environment variable holding user:password for basic auth")


@dataclass
class ArenaReportConfig:
    db: str = key(DB, "the arena's SQLite database")
    judgments: Optional[str] = key(None, "a judge's judgments.jsonl: agreement between the voters and the judge")
    output_dir: Optional[str] = key(None, "where arena_report.json, the PNG and votes.csv go (default: DB-report "
                                          "beside the database: outputs/arena/arena-report)")


def load_arena_config(argv: list[str]) -> ArenaConfig:
    cfg = build(ArenaConfig, [command_line(argv, ArenaConfig)], ARENA)
    check([(bool(cfg.a), "a", "must be set"), (bool(cfg.b), "b", "must be set")])
    return cfg


def load_arena_report_config(argv: list[str]) -> ArenaReportConfig:
    cfg = build(ArenaReportConfig, [command_line(argv, ArenaReportConfig)], f"{ARENA} report")
    check([(bool(cfg.db), "db", "must be set"),
           (not cfg.db or Path(cfg.db).is_file(), "db", f": {cfg.db}: no such database")])
    return cfg
