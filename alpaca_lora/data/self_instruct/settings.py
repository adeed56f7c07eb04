"""The data builder's keys: ``alpaca-lora data [mode] key=value ...``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from alpaca_lora.common.settings import build, check, command_line, key
from alpaca_lora.data.loading import MAX_DOWNLOAD_BYTES, MAX_DOWNLOAD_HELP
from alpaca_lora.data.self_instruct.tasks import STANFORD_SEED_TASKS
from alpaca_lora.endpoint.settings import EndpointSettings

TOOL = "data"
MODES = ("generate", "regenerate", "clean")


@dataclass
class BuilderConfig(EndpointSettings):
    """The builder's own keys, after the endpoint keys every caller of an endpoint takes."""

    mode: str = key("generate", "generate: new instructions; regenerate: new outputs for input=; "
                                "clean: input= by heuristics")
    model: Optional[str] = key(None, "the teacher model's name at the endpoint (generate, regenerate)")
    api: str = key("chat", "chat (chat completions) or completions (the legacy text completions endpoint)")
    seed_tasks: str = key(STANFORD_SEED_TASKS, "the 175 Self-Instruct seed tasks (JSONL path or URL, cached)")
    prompt_file: Optional[str] = key(None, "generation prompt text file (default: this project's own prompt)")
    prompt_tasks: int = key(3, "seed tasks shown as examples in each request")
    tasks_per_request: int = key(20, "length of the numbered list each request asks for (examples included)")
    target: int = key(52000, "instructions to keep (generate)")
    input: Optional[str] = key(None, "Alpaca data to regenerate or clean (.json/.jsonl, URL, hub id)")
    output: Optional[str] = key(None, "final Alpaca JSON; the journal and summary are written beside it "
                                      "(default: outputs/self_instruct/alpaca_data.json; INPUT.regenerated/.clean.json "
                                      "beside a local input, under outputs/self_instruct/ for a URL or hub id)")
    template: str = key("alpaca", "prompt template for regenerate: the prompt the fine-tuned model will see")
    similarity: float = key(0.7, "drop an instruction whose ROUGE-L F1 with a seed or kept one is above this")
    temperature: Optional[float] = key(1.0, "sampling temperature (Stanford: 1.0); null to leave it to the server")
    top_p: Optional[float] = key(1.0, "nucleus sampling (Stanford: 1.0); null to leave it to the server")
    max_tokens: Optional[int] = key(3072, "completion token limit per request (Stanford: 3072); null for none")
    stop: Optional[List[str]] = key(None, "stop sequences (default: the opening of the task after the list); "
                                          "[] for none")
    extra_body: Dict[str, Any] = key({}, "more request fields for the endpoint, "
                                         "e.g. extra_body.max_completion_tokens=4096")
    seed: int = key(0, "seed for the choice of example tasks (request N always shows the same ones)")
    max_download_bytes: int = key(MAX_DOWNLOAD_BYTES, MAX_DOWNLOAD_HELP)

    @property
    def output_path(self) -> Path:
        if self.output:
            return Path(self.output)
        if self.mode == "generate":
            return Path("outputs/self_instruct/alpaca_data.json")
        suffix = ".regenerated.json" if self.mode == "regenerate" else ".clean.json"
        local = Path(self.input).expanduser()
        downloaded = self.input.startswith(("http://", "https://", "builtin:"))
        if not downloaded and (local.is_file() or local.suffix in (".json", ".jsonl") or
                               self.input.startswith((".", "/", "~"))):
            return local.with_name(local.stem + suffix)  # beside the input, as --help says
        name = Path(self.input.split("?", 1)[0].removeprefix("builtin:").rstrip("/")).stem or "data"
        return Path("outputs/self_instruct") / (name + suffix)  # a URL, hub or built-in set: under outputs/

    @property
    def journal_path(self) -> Path:
        return self.output_path.with_name(self.output_path.stem + ".journal.jsonl")

    @property
    def summary_path(self) -> Path:
        return self.output_path.with_name(self.output_path.stem + ".summary.json")

    @property
    def stop_sequences(self) -> list[str]:
        return [f"{self.tasks_per_request + 1}. Instruction"] if self.stop is None else list(self.stop)


def load_builder_config(overrides: list[str]) -> BuilderConfig:
    cfg: BuilderConfig = build(BuilderConfig, [command_line(overrides, BuilderConfig)], TOOL)
    check(cfg.endpoint_checks() + [
        (cfg.mode in MODES, "mode", f"must be one of {', '.join(MODES)}"),
        (cfg.mode == "clean" or bool(cfg.model), "model", "must be set (the teacher model's name)"),
        (cfg.mode not in ("regenerate", "clean") or bool(cfg.input), "input", f"must be set for mode={cfg.mode}"),
        (cfg.api in ("chat", "completions"), "api", "must be chat or completions"),
        (cfg.prompt_tasks >= 1, "prompt_tasks", "must be at least 1"),
        (cfg.tasks_per_request > cfg.prompt_tasks, "tasks_per_request", "must be more than prompt_tasks"),
        (cfg.target >= 1, "target", "must be at least 1"),
        (0.0 <= cfg.similarity <= 1.0, "similarity", "must be between 0 and 1"),
        (cfg.max_download_bytes >= 1, "max_download_bytes", "must be at least 1"),
    ])
    return cfg

