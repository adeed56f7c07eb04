"""``make demo-feedback`` (``python -m alpaca_lora.feedback.demo``): the feedback loop on the CPU demo, offline.

1. ``alpaca-lora app`` serves the SFT demo adapter (``make demo``'s outputs/demo) with ``feedback_db=`` and
   ``terms=``; scripted visitors (``feedback.voter``) accept the terms and vote through its API on instructions
   whose answers can be checked: new skills tasks, none of them in the demo's training or held-out data.
2. ``alpaca-lora feedback export`` turns the votes into DPO pairs and KTO rows.
3. ``alpaca-lora train recipe=dpo_demo`` and ``recipe=kto_demo`` tune the SFT adapter on them.
4. ``alpaca-lora evaluate answer held_out=outputs/demo`` for the SFT, DPO and KTO adapters (the demo's 100
   held-out items), ``evaluate judge judge=reference`` of each tuned adapter against the SFT one, and the
   before/after table (printed, and written to outputs/demo-feedback/before_after.md).

Every step is the command a user would run, printed before it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from alpaca_lora.common.paths import atomic_write_text
from alpaca_lora.evaluate.exact_match import is_exact_match

SFT = Path("outputs/demo")
WORK = Path("outputs/demo-feedback")
TUNED = {"dpo": Path("outputs/demo-dpo"), "kto": Path("outputs/demo-kto")}
VISITORS = 120  # instructions the scripted visitors ask
TERMS = """# Terms of use of this demo

The model answers for research only. By accepting you agree that your votes and the answers you vote on
(with the name you type, if any) are stored and may be used to train the model."""


def visitor_items(count: int) -> list[dict]:
    """Skills tasks the demo never trained or evaluated on: drawn with another seed, its own set left out."""
    from alpaca_lora.data.builtin import skills

    known = {(r["instruction"], r["input"]) for r in skills()}
    fresh = [r for r in skills(size=count + len(known) // 4, seed=1) if (r["instruction"], r["input"]) not in known]
    return fresh[:count]


def command(*args: str) -> None:
    """``alpaca-lora ARGS`` in its own process, printed first; a failure stops the demo."""
    print(f"\n$ alpaca-lora {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "alpaca_lora", *args], check=True)


@contextmanager
def running_app(db: Path, terms: Path):
    """``alpaca-lora app`` on a free loopback port until the block ends; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["app", f"adapter={SFT}", f"feedback_db={db}", f"terms={terms}", f"port={port}", "max_batch=8"]
    print(f"\n$ alpaca-lora {' '.join(args)} &", flush=True)
    app = subprocess.Popen([sys.executable, "-m", "alpaca_lora", *args])
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if app.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the app did not start (exit code {app.poll()})") from None
                time.sleep(1)
        yield url
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()


def kto_balance() -> list[str]:
    """The desirable_weight the export's summary recommends for the votes' balance (its lower end: 1:1)."""
    weights = json.loads((WORK / "summary.json").read_text())["kto"]["desirable_weight"]
    return [f"preference.desirable_weight={weights[0]}"] if weights else []


def accuracy(answers: Path) -> tuple[int, int]:
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    return sum(is_exact_match(r["output"], r["reference"]) for r in records), len(records)


def before_after() -> str:
    """The table: exact match of each adapter on the held-out items, and each tuned one judged against SFT."""
    correct, total = accuracy(WORK / "answers" / "sft.jsonl")
    lines = [f"| adapter | exact match on the {total} held-out items | against SFT (judge=reference): wins / ties / "
             "losses | win rate (95% CI) |", "|---|---|---|---|",
             f"| SFT ({SFT}) | {correct / total:.0%} ({correct}) | | |"]
    for name, adapter in TUNED.items():
        correct, total = accuracy(WORK / "answers" / f"{name}.jsonl")
        report = json.loads((WORK / "judge" / f"{name}_vs_sft" / "report.json").read_text())
        low, high = report["ci95"]
        lines.append(f"| {name.upper()} ({adapter}) | {correct / total:.0%} ({correct}) | {report['wins_a']} / "
                     f"{report['ties']} / {report['wins_b']} | {report['win_rate_a']:.1%} ({low:.1%} to {high:.1%}) |")
    return "\n".join(lines)


def main() -> int:
    if not (SFT / "adapter_model.safetensors").is_file():
        print(f"error: {SFT} holds no adapter: run make demo first", file=sys.stderr)
        return 2
    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    (WORK / "TERMS.md").write_text(TERMS + "\n")
    items = visitor_items(VISITORS)
    with running_app(WORK / "feedback.sqlite", WORK / "TERMS.md") as url:
        from alpaca_lora.feedback.voter import vote_on

        outcomes = vote_on(url, items)
    print(f"\nscripted visitors voted on {len(items)} instructions: " + ", ".join(
        f"{n} {choice}" for choice, n in sorted(outcomes.items())), flush=True)
    command("feedback", "export", f"feedback_db={WORK / 'feedback.sqlite'}", f"adapter={SFT}", f"output_dir={WORK}")
    command("train", "recipe=dpo_demo", "overwrite=true")
    command("train", "recipe=kto_demo", "overwrite=true", *kto_balance())
    for name, adapter in {"sft": SFT, **TUNED}.items():
        command("evaluate", "answer", f"held_out={SFT}", f"adapter={adapter}", f"generator=demo-{name}",
                f"output={WORK / 'answers' / f'{name}.jsonl'}", "max_new_tokens=32", "batch_size=16")
    for name in TUNED:
        command("evaluate", "judge", f"a={WORK / 'answers' / f'{name}.jsonl'}", f"b={WORK / 'answers' / 'sft.jsonl'}",
                "judge=reference", f"output_dir={WORK / 'judge' / f'{name}_vs_sft'}")
    table = before_after()
    minutes = (time.monotonic() - started) / 60
    atomic_write_text(WORK / "before_after.md", f"{table}\n\nmake demo-feedback took {minutes:.0f} minutes "
                                                 f"({os.cpu_count()} CPUs).\n")
    print(f"\n{table}\n\nthe feedback loop took {minutes:.0f} minutes; the table: {WORK / 'before_after.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
