"""Training under faults and bad input (issue 14): kill -9 inside checkpoint writes and resume, a
second run into the same output_dir, a checkpoint of another run, data with no usable example."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from alpaca_lora.train.config import load_config
from alpaca_lora.train.run import main, train
from alpaca_lora.train.runtime import resolve_runtime
from tests.train.runs import RECORDS, StepCounter, tiny_run

REPO = Path(__file__).resolve().parents[2]
SAVED_CONFIG = "training_config.yaml"


def steps_of(out: Path) -> dict[int, Path]:
    found = {}
    for path in out.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines[-5:]
    return lines[-1]


def tokenizer_only(tiny_model_dir, tmp_path) -> Path:
    """A model directory whose tokenizer loads and whose weights do not: an error from it proves the
    model was never loaded."""
    directory = tmp_path / "tokenizer-only"
    directory.mkdir()
    for path in tiny_model_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, directory / path.name)
    return directory


# --- torn checkpoints ------------------------------------------------------------------------------------


def test_kill_9_inside_checkpoint_writes_again_and_again_and_resume_each_time(tiny_model_dir, tmp_path):
    """Each run is killed while transformers is writing a checkpoint (the directory exists, its
    trainer_state.json does not yet); the next run resumes from the newest complete checkpoint and
    says which torn one it skipped. The last run finishes the job."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "alpaca_lora.train",
               *tiny_run(tiny_model_dir, tmp_path, "max_steps=14", "save_steps=1", "save_total_limit=3")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    torn = None
    for attempt in range(3):
        floor = max(steps_of(out), default=0)  # a leftover torn directory is not this run's write
        log = tmp_path / f"run-{attempt}.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(command + (["resume_from_checkpoint=true"] if torn else []), env=env,
                                       stdout=subprocess.DEVNULL, stderr=stderr)
            deadline, caught = time.monotonic() + 300, None
            while caught is None and process.poll() is None and time.monotonic() < deadline:
                steps = steps_of(out)
                complete = [s for s, p in steps.items() if (p / "trainer_state.json").is_file()]
                writing = [s for s, p in steps.items() if s > floor and not (p / "trainer_state.json").exists()]
                if complete and writing:
                    process.send_signal(signal.SIGKILL)
                    caught = steps[max(writing)]
                time.sleep(0.001)
            process.kill()
            process.wait()
        assert caught is not None and process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        assert not (caught / "trainer_state.json").exists()  # killed inside the write: the checkpoint is torn
        if torn is not None:
            text = log.read_text()
            assert f"skipping {torn.name}" in text and "resuming from " in text, text[-3000:]
        torn = caught
    final = subprocess.run(command + ["resume_from_checkpoint=true"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"skipping {torn.name}" in final.stderr
    assert json.loads((out / "checkpoint-14" / "trainer_state.json").read_text())["global_step"] == 14
    assert json.loads((out / "metrics.json").read_text())["adapter_parameters"] > 0
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in load_file(out / "adapter_model.safetensors").items())


@pytest.fixture(scope="module")
def run_a(tiny_model_dir, tmp_path_factory) -> Path:
    """Run A: 4 steps on RECORDS, LoRA r=8, checkpoints 2 and 4."""
    directory = tmp_path_factory.mktemp("run-a")
    main(tiny_run(tiny_model_dir, directory, "max_steps=4", "save_steps=2", "save_total_limit=5"))
    return directory


def copy_of(run_a: Path, tmp_path: Path) -> Path:
    """Run A's output directory, copied to ``tmp_path / "out"`` (the same data file)."""
    shutil.copytree(run_a / "out", tmp_path / "out")
    return tmp_path / "out"


def again(model_dir, run_a: Path, tmp_path: Path, *overrides) -> list[str]:
    """Run A's command line, into the copy, with ``overrides``."""
    return [*tiny_run(model_dir, tmp_path, f"data={run_a / 'data.json'}"), *overrides]


def only_adapter_files(checkpoint: Path) -> None:
    """What a kill leaves after transformers wrote the adapter and before the rest."""
    for path in checkpoint.iterdir():
        if not path.name.startswith("adapter_"):
            path.unlink()


def test_a_torn_newest_checkpoint_is_skipped_with_a_note(tiny_model_dir, run_a, tmp_path, capsys):
    """The issue's case: checkpoint-6 holds only the adapter files (no trainer_state.json yet)."""
    out = copy_of(run_a, tmp_path)
    (out / "checkpoint-6").mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(out / "checkpoint-4" / name, out / "checkpoint-6" / name)
    counter = StepCounter()
    cfg = load_config(again(tiny_model_dir, run_a, tmp_path, "max_steps=6", "save_steps=2",
                            "resume_from_checkpoint=true"))
    result = train(cfg, resolve_runtime(cfg), callbacks=[counter])
    assert counter.steps == [5, 6] and result.trainer.state.global_step == 6
    err = capsys.readouterr().err
    assert "skipping checkpoint-6" in err and "resuming from " in err and "checkpoint-4" in err
    assert (out / "checkpoint-6" / "trainer_state.json").is_file()  # written again, whole this time


def test_only_torn_checkpoints_is_one_line_before_the_model_loads(tiny_model_dir, run_a, tmp_path, capsys):
    out = copy_of(run_a, tmp_path)
    for step in (2, 4):
        only_adapter_files(out / f"checkpoint-{step}")
    args = again(tokenizer_only(tiny_model_dir, tmp_path), run_a, tmp_path, "max_steps=6")
    with pytest.raises(SystemExit):
        main([*args, "resume_from_checkpoint=true"])
    error = last_error(capsys)
    assert "key 'resume_from_checkpoint'" in error and "no complete checkpoint" in error and "checkpoint-4" in error
    with pytest.raises(SystemExit):
        main([*args, f"resume_from_checkpoint={out / 'checkpoint-4'}"])
    error = last_error(capsys)
    assert "checkpoint-4" in error and "incomplete" in error


class SealWatcher(TrainerCallback):
    """Records, as each checkpoint is written, whether it already carried a run configuration."""

    def __init__(self):
        self.sealed_while_written = {}

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / SAVED_CONFIG
        self.sealed_while_written[state.global_step] = path.exists()


def test_a_checkpoint_written_again_is_not_complete_until_it_is_whole(tiny_model_dir, run_a, tmp_path):
    """Resuming from checkpoint-2 writes checkpoint-4 again: while it is rewritten it must not look
    complete (a kill then would leave old and new files mixed under an old seal)."""
    out = copy_of(run_a, tmp_path)
    assert (out / "checkpoint-4" / SAVED_CONFIG).is_file()  # complete checkpoints carry their run's config
    watcher = SealWatcher()
    cfg = load_config(again(tiny_model_dir, run_a, tmp_path, "max_steps=4", "save_steps=2",
                            f"resume_from_checkpoint={out / 'checkpoint-2'}"))
    train(cfg, resolve_runtime(cfg), callbacks=[watcher])
    assert watcher.sealed_while_written == {4: False}
    assert (out / "checkpoint-4" / SAVED_CONFIG).is_file()


# --- a second run into the same output_dir ---------------------------------------------------------------


def test_a_second_run_into_the_same_output_dir_is_refused_unless_overwrite(tiny_model_dir, run_a, tmp_path, capsys):
    out = copy_of(run_a, tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(RECORDS[:12]))
    run_b = tiny_run(tokenizer_only(tiny_model_dir, tmp_path), tmp_path, "max_steps=3", "save_steps=1",
                     "lora.r=4", f"data={other}")
    with pytest.raises(SystemExit) as stopped:
        main(run_b)
    assert stopped.value.code == 2
    error = last_error(capsys)
    assert f"key 'output_dir': {out}" in error and "another run" in error
    assert "resume_from_checkpoint" in error and "overwrite=true" in error
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched

    run_b = tiny_run(tiny_model_dir, tmp_path, "max_steps=3", "save_steps=1", "lora.r=4", f"data={other}")
    main([*run_b, "overwrite=true"])
    assert sorted(steps_of(out)) == [1, 2, 3]  # run B's checkpoints only: none of A's left to resume by mistake
    assert json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())["r"] == 4
    assert yaml.safe_load((out / SAVED_CONFIG).read_text())["config"]["lora"]["r"] == 4
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_overwrite_and_resume_together_are_refused(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(tiny_run(tiny_model_dir, tmp_path, "overwrite=true", "resume_from_checkpoint=true"))
    assert last_error(capsys) == ("error: key 'overwrite' cannot go with resume_from_checkpoint (resuming keeps "
                                  "the run in output_dir, overwrite replaces it)")


# --- a checkpoint of another run -------------------------------------------------------------------------

OTHER_RUNS = [
    pytest.param(["lora.r=4"], "lora.r", id="lora-rank"),  # shapes differ: transformers dies on a size mismatch
    pytest.param(["lora.alpha=32"], "lora.alpha", id="lora-alpha"),  # same shapes: a wrong resume without a word
    pytest.param(["data={other}"], "data", id="other-data"),
    pytest.param(["model={model_copy}"], "model", id="other-base"),
    pytest.param(["template=alpaca_lora"], "template", id="template"),
    pytest.param(["max_length=48"], "max_length", id="max-length"),
    pytest.param(["quant.bits=16"], "quant.bits", id="quant-bits"),
    pytest.param(["seed=7"], "seed", id="seed"),
]


@pytest.mark.parametrize("change, key", OTHER_RUNS)
def test_resume_refuses_a_checkpoint_of_another_run_before_the_model_loads(tiny_model_dir, run_a, tmp_path, capsys,
                                                                            change, key):
    copy_of(run_a, tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(RECORDS[:12]))
    model_copy = shutil.copytree(tiny_model_dir, tmp_path / "model-copy")
    change = [c.format(other=other, model_copy=model_copy) for c in change]
    with pytest.raises(SystemExit) as stopped:
        main(again(tiny_model_dir, run_a, tmp_path, "max_steps=6", "save_steps=2", "resume_from_checkpoint=true",
                   *change))
    assert stopped.value.code == 2
    error = last_error(capsys)
    assert "checkpoint-4" in error and "another run" in error and f"{key}:" in error, error


def test_resume_with_paths_spelled_differently_is_the_same_run(tiny_model_dir, run_a, tmp_path, monkeypatch):
    copy_of(run_a, tmp_path)
    monkeypatch.chdir(run_a)
    counter = StepCounter()
    cfg = load_config(again(tiny_model_dir, run_a, tmp_path, "max_steps=5", "save_steps=2",
                            "resume_from_checkpoint=true", "data=./data.json"))
    train(cfg, resolve_runtime(cfg), callbacks=[counter])
    assert counter.steps == [5]


# --- no usable example -----------------------------------------------------------------------------------

NO_EXAMPLE = [
    pytest.param("train.json", "[]", [], "no records", id="empty-json-list"),
    pytest.param("train.jsonl", "", [], "no records", id="empty-jsonl"),
    pytest.param("train.json", json.dumps(RECORDS), ["max_length=32"], "max_length=32", id="every-prompt-too-long"),
    pytest.param("train.json", json.dumps([{**r, "output": " ".join([r["output"]] * 20)} for r in RECORDS]),
                 ["truncation=drop"], "max_length=64", id="every-example-dropped"),
]


@pytest.mark.parametrize("name, text, overrides, reason", NO_EXAMPLE)
def test_no_usable_example_is_one_line_naming_the_file_before_the_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                              name, text, overrides, reason):
    data = tmp_path / name
    data.write_text(text)
    with pytest.raises(SystemExit) as stopped:  # val_set_size=2000 (the issue's): the file is named, not the split
        main([*tiny_run(tokenizer_only(tiny_model_dir, tmp_path), tmp_path), f"data={data}",
              *(overrides or ["val_set_size=2000"])])
    assert stopped.value.code == 2
    error = last_error(capsys)
    assert error.startswith(f"error: {data}:") and reason in error, error
    assert not (tmp_path / "out").exists()
