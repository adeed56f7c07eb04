"""``alpaca-lora data [generate|regenerate|clean] key=value ...`` (also ``python -m alpaca_lora.data.self_instruct``)

Everything checkable (keys, seed tasks, prompt, input data, prices, the journal) is checked before
the first request. Every finished request is journaled, so the same command resumes a stopped run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from alpaca_lora.common.errors import UserError
from alpaca_lora.common.journal import Journal
from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.paths import atomic_write_text
from alpaca_lora.common.settings import entry_point, help_text
from alpaca_lora.data.loading import load_records
from alpaca_lora.data.self_instruct.clean import clean_records
from alpaca_lora.data.self_instruct.jobs import GenerateJob, RegenerateJob
from alpaca_lora.data.self_instruct.settings import TOOL, BuilderConfig, load_builder_config
from alpaca_lora.data.self_instruct.tasks import DEFAULT_PROMPT, load_seed_tasks
from alpaca_lora.data.templates import get_template
from alpaca_lora.endpoint.runner import MAX_CONSECUTIVE_FAILURES, Totals, run_requests, summary
from alpaca_lora.endpoint.stops import exit_code, stop_on_sigterm

log = get_logger(__name__).info


def main(argv: list[str] | None = None) -> int:
    return entry_point(argv, lambda: help_text(TOOL, "[mode=generate|regenerate|clean] key=value ...", BuilderConfig),
                       load_builder_config, lambda cfg: clean(cfg) if cfg.mode == "clean" else ask_teacher(cfg)) or 0


def ask_teacher(cfg: BuilderConfig) -> int:
    if cfg.mode == "generate":
        seeds = load_seed_tasks(cfg.seed_tasks, cfg.max_download_bytes)
        if len(seeds) < cfg.prompt_tasks:
            raise UserError(f"{cfg.seed_tasks}: {len(seeds)} seed tasks, fewer than prompt_tasks={cfg.prompt_tasks}")
        job = GenerateJob(seeds, _read_prompt(cfg.prompt_file), cfg.prompt_tasks, cfg.target, cfg.similarity, cfg.seed)
    else:
        data = load_records(cfg.input, max_download_bytes=cfg.max_download_bytes)
        job = RegenerateJob(data.records, get_template(cfg.template), data.source)
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                "stop": cfg.stop_sequences or None, "extra_body": cfg.extra_body or None}
    teacher = cfg.open_endpoint(cfg.model, cfg.api, sampling)  # max_cost without a price: refused here
    journal = Journal(cfg.journal_path)
    entries = journal.read()
    job.restore(entries, journal)
    totals = Totals()
    for entry in entries:
        totals.add(entry)
    log(f"{cfg.mode}: model {cfg.model} at {teacher.client.base_url}, {cfg.api} API, "
        f"{cfg.concurrency} requests in flight; journal {journal.path}")
    if entries:
        log(f"resuming: {job.done()} records from {totals.requests} earlier requests")

    stop_on_sigterm()  # a scheduler's preemption, `kill`: stop cleanly
    started = time.monotonic()
    budget = cfg.budget()
    stop = run_requests(job, teacher, journal, budget, totals, cfg.mode, desc=cfg.mode)
    records = job.final_records()
    atomic_write_text(cfg.output_path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    report = {"mode": cfg.mode, "model": cfg.model, "endpoint": str(teacher.client.base_url),
              "output": str(cfg.output_path), "journal": str(journal.path),
              **summary(job, totals, teacher, stop, time.monotonic() - started, job.total)}
    atomic_write_text(cfg.summary_path, json.dumps(report, indent=2) + "\n")
    cost = "" if report["cost_usd"] is None else f", ${report['cost_usd']:,.4f}"
    log(f"{len(records)} of {job.total} records in {cfg.output_path} after {totals.requests} requests"
        f" ({totals.prompt_tokens + totals.completion_tokens:,} tokens{cost}); stopped: {stop}")
    if report["discarded"]:
        log("discarded: " + ", ".join(f"{reason} {n}" for reason, n in report["discarded"].items()))
    if stop == "endpoint_failing":
        log(f"stopped after {MAX_CONSECUTIVE_FAILURES} failed requests in a row; the last error: {totals.last_error}")
    if stop in ("max_requests", "max_cost"):
        log(f"raise {stop} and run the same command to continue")
    elif not job.finished():
        log("run the same command again to continue")
    log(f"summary: {cfg.summary_path}")
    return exit_code(stop)


def clean(cfg: BuilderConfig) -> int:
    data = load_records(cfg.input, allow_empty=True, max_download_bytes=cfg.max_download_bytes)
    report = clean_records(data.records, duplicates_already_dropped=data.duplicates_dropped)
    atomic_write_text(cfg.output_path, json.dumps(report.kept, indent=2, ensure_ascii=False) + "\n")
    report_path = cfg.output_path.with_name(cfg.output_path.stem + ".clean_report.json")
    atomic_write_text(report_path, json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n")
    log(f"{report.rows_in} records in, {len(report.kept)} out: {cfg.output_path}")
    for kind, counts in (("dropped", report.dropped), ("fixed", report.fixed)):
        for reason, n in counts.most_common():
            log(f"  {kind:<8} {reason:<28} {n}")
    log(f"report with examples: {report_path}")
    return 0


def _read_prompt(path: str | None) -> str:
    if path is None:
        return DEFAULT_PROMPT
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the prompt file: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
