"""``harness``: lm-evaluation-harness's own evaluator on the model exactly as it was trained and served.

The model is loaded as ``generate`` and ``serve`` load it (an adapter on its base in the bits it was trained in,
or a merged model as stored) and handed to lm-eval as an instance (its ``HFLM`` takes one), so the numbers are
those of that model, not of a 16-bit reload of its base. ``compare_base=true`` scores the same loaded model again
with the adapter disabled: what fine-tuning changed, task by task. Tasks are lm-eval's (by name: it downloads
their data where there is a hub), task YAML files, or directories of them.

Writes ``report.json`` (every metric with its standard error, per run), ``report.md`` (the table, also printed:
ours, not lm-eval's ``make_table``, whose pytablewriter the pinned set cannot upgrade) and ``samples_RUN.jsonl``
(each document's prompt, response or choice log-likelihoods, and scores). Model responses are cached in
``output_dir`` (lm-eval's ``use_cache``, one file per run and model), so a stopped run resumes where it was.

lm-eval is the ``eval`` extra: imported here only, so the rest of the package works without it.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

from alpaca_lora.common.errors import ConfigError, UserError
from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.paths import atomic_write_text
from alpaca_lora.evaluate.answers import file_name
from alpaca_lora.evaluate.settings import HarnessConfig, looks_like_path

log = get_logger(__name__).info
INSTALL = "evaluate harness needs lm-evaluation-harness: pip install 'alpaca-lora[eval]'"


def import_lm_eval():
    """lm-eval's evaluator, its HFLM and its TaskManager; one line saying how to install it when it is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(INSTALL) from None
    return lm_eval, HFLM, TaskManager


def resolve_tasks(entries: list[str], task_manager_class) -> tuple[object, list[str]]:
    """lm-eval's TaskManager and the task specs to run: a directory's tasks by name (the directory indexed), a YAML
    file by its path, a name as registered. lm-eval's own tasks are indexed only when a name needs them (seconds)."""
    directories = [str(Path(e).expanduser().resolve()) for e in entries if Path(e).expanduser().is_dir()]
    names = [e for e in entries if not looks_like_path(e)]
    manager = task_manager_class(include_path=directories or None, include_defaults=bool(names))
    specs, problems = [], []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = task_manager_class(include_path=str(path.resolve()), include_defaults=False).all_subtasks
            specs += found
            problems += [] if found else [f"key 'tasks': {entry}: no task YAML in this directory"]
        elif looks_like_path(entry):
            specs.append(str(path.resolve()))
        elif manager.match_tasks([entry]):
            specs.append(entry)
        else:
            problems.append(f"key 'tasks': {entry} is neither a task lm-eval knows (lm_eval ls tasks lists them) "
                            "nor a task YAML file or directory")
    if problems:
        raise ConfigError("\n".join(problems))
    return manager, list(dict.fromkeys(specs))


def check_tasks_load(manager, specs: list[str]) -> None:
    """Each task built (its data downloaded or read) before the model loads: a task that cannot be is one line."""
    for spec in specs:
        try:
            manager.load_task_or_group([spec])
        except Exception as exc:  # lm-eval's and datasets' errors: a missing file, the hub offline, a bad YAML
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(f"key 'tasks': {spec}: cannot load it ({type(exc).__name__}: {message})") from None


def run_harness(cfg: HarnessConfig) -> int:
    from alpaca_lora.inference.loading import load_for_inference

    lm_eval, hflm_class, task_manager_class = import_lm_eval()
    manager, specs = resolve_tasks(cfg.task_entries(), task_manager_class)
    check_tasks_load(manager, specs)
    loaded = load_for_inference(cfg)
    chat = bool(loaded.tokenizer.chat_template) if cfg.chat_template is None else cfg.chat_template
    if chat and not loaded.tokenizer.chat_template:
        raise UserError(f"chat_template=true: the tokenizer of {loaded.name} has no chat template")
    output_dir = Path(cfg.output_dir or f"outputs/evaluate/harness/{file_name(loaded.name)}")
    log(f"lm-evaluation-harness on {loaded.description}: {', '.join(specs)}"
        + (", and on the base with the adapter disabled" if cfg.compare_base else ""))
    lm = hflm_class(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=cfg.batch_size)
    runs = {}
    for run in (["adapter", "base"] if cfg.compare_base else ["adapter" if cfg.adapter else "model"]):
        with loaded.model.disable_adapter() if run == "base" else nullcontext():
            cache = output_dir / "lm_eval_cache" / f"{run}-{fingerprint(cfg, loaded, chat, run)}"
            cache.parent.mkdir(parents=True, exist_ok=True)
            runs[run] = lm_eval.simple_evaluate(
                model=lm, tasks=specs, task_manager=manager, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                use_cache=str(cache), log_samples=True, apply_chat_template=chat, fewshot_as_multiturn=False,
                random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed)
    report = build_harness_report(cfg, loaded, chat, specs, runs)
    write_harness_report(report, runs, output_dir)
    return 0


def fingerprint(cfg: HarnessConfig, loaded, chat: bool, run: str) -> str:
    """Names a response cache by what decides the responses (the model, its weights' files, the prompt form), so a
    changed adapter or model in the same output_dir never reuses another's responses."""
    files = []
    for directory in filter(None, [cfg.adapter, cfg.model]):
        path = Path(directory).expanduser()
        if path.is_dir():
            files += [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.glob("*.safetensors"))]
    identity = [loaded.description, run, chat, cfg.num_fewshot, cfg.seed, files]
    return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:16]


def evaluated_form(cfg: HarnessConfig) -> str:
    if cfg.adapter:
        bits = f"{cfg.quant.bits}-bit" if cfg.quant.bits != 16 else "16-bit"
        return f"adapter on its {bits} base, as trained and served"
    return "model as stored (a merged or fully trained model, or a base)"


def summarize(result: dict) -> dict:
    """``{task: {"version", "num_fewshot", "n", "group", "metrics": {name: {"value", "stderr", "filter",
    "higher_is_better"}}}}`` from lm-eval's results; a metric under a filter other than none is ``name (filter)``."""
    out = {}
    for section in ("results", "groups"):
        for task, row in (result.get(section) or {}).items():
            if section == "groups" and task in out:
                continue
            metrics = {}
            for name, value in row.items():
                if "," not in name or "_stderr," in name or not isinstance(value, (int, float)):
                    continue
                metric, filtered = name.split(",", 1)
                stderr = row.get(f"{metric}_stderr,{filtered}")
                metrics[metric if filtered == "none" else f"{metric} ({filtered})"] = {
                    "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None, "filter": filtered,
                    "higher_is_better": (result.get("higher_is_better") or {}).get(task, {}).get(metric)}
            samples = (result.get("n-samples") or {}).get(task) or {}
            out[task] = {"version": (result.get("versions") or {}).get(task),
                         "num_fewshot": (result.get("n-shot") or {}).get(task), "n": samples.get("effective"),
                         "group": section == "groups", "metrics": metrics}
    return out


def build_harness_report(cfg: HarnessConfig, loaded, chat: bool, specs: list[str], runs: dict) -> dict:
    first = next(iter(runs.values()))
    return {"evaluated": evaluated_form(cfg), "model": loaded.description, "base": cfg.model, "adapter": cfg.adapter,
            "bits": cfg.quant.bits, "template": loaded.template.name, "chat_template": chat, "tasks": specs,
            "num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "lm_eval_version": first.get("lm_eval_version"),
            "runs": {name: summarize(result) for name, result in runs.items()}}


def format_table(report: dict) -> str:
    """One row per task and metric, one column per run (value ± standard error), and adapter − base."""
    names = list(report["runs"])
    compare = names == ["adapter", "base"]
    lines = ["| task | metric | " + " | ".join(names) + (" | Δ |" if compare else " |"),
             "|---|---|" + "---:|" * (len(names) + compare)]
    first = report["runs"][names[0]]
    for task, row in first.items():
        for metric in row["metrics"]:
            values = [report["runs"][name].get(task, {}).get("metrics", {}).get(metric) for name in names]
            cells = [_cell(value) for value in values]
            if compare:
                both = values[0] and values[1]
                cells.append(f"{values[0]['value'] - values[1]['value']:+.3f}" if both else "-")
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: dict | None) -> str:
    if value is None:
        return "-"
    return f"{value['value']:.3f}" + (f" ± {value['stderr']:.3f}" if value["stderr"] is not None else "")


def sample_rows(task: str, samples: list[dict]) -> list[dict]:
    """Each document as read back by people: its prompt, the response (generation) or each choice's
    log-likelihood (multiple choice), the target and the scores."""
    rows = []
    for sample in samples:
        arguments = [list(a.values()) if isinstance(a, dict) else list(a) for a in _arguments(sample["arguments"])]
        row = {"task": task, "doc_id": sample["doc_id"], "target": sample["target"], "prompt": arguments[0][0]}
        responses = sample["filtered_resps"]
        if responses and isinstance(responses[0], (list, tuple)):  # (log-likelihood, is greedy) per choice
            row.update(choices=[a[1] for a in arguments], loglikelihoods=[float(r[0]) for r in responses])
        else:
            row["response"] = responses
        rows.append({**row, **{metric: sample.get(metric) for metric in sample.get("metrics", [])}})
    return rows


def _arguments(arguments) -> list:
    return list(arguments.values()) if isinstance(arguments, dict) else list(arguments)


def write_harness_report(report: dict, runs: dict, output_dir: Path) -> None:
    from lm_eval.utils import handle_non_serializable

    table = format_table(report)
    atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False,
                                                             default=handle_non_serializable) + "\n")
    atomic_write_text(output_dir / "report.md", table)
    for name, result in runs.items():
        rows = [row for task, samples in (result.get("samples") or {}).items() for row in sample_rows(task, samples)]
        atomic_write_text(output_dir / f"samples_{name}.jsonl", "".join(
            json.dumps(row, ensure_ascii=False, default=handle_non_serializable) + "\n" for row in rows))
    print(f"{report['evaluated']}: {report['model']}\n{table}", end="", flush=True)
    log(f"report: {output_dir / 'report.json'}, table: {output_dir / 'report.md'}, "
        f"documents: {output_dir}/samples_RUN.jsonl")
