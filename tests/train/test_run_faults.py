"""Training under faults and bad input: kill -9 inside checkpoint writes and resume, a
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


@pytest.mark.slow
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


# --- what a run leaves for others, and for the next run ---------------------------------------------------


def test_a_runs_outputs_are_readable_as_plain_writes_would_be(run_a):
    """Under umask 022 adapter_model.safetensors was 0600 (safetensors 0.8 writes owner-only), and so were
    metrics.json and training_config.yaml (atomic writes): a serving account got Permission denied."""
    umask = os.umask(0o077)
    os.umask(umask)
    out = run_a / "out"
    for name in ("adapter_model.safetensors", "metrics.json", SAVED_CONFIG, "loss.png",
                 "checkpoint-4/adapter_model.safetensors", f"checkpoint-4/{SAVED_CONFIG}"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_the_adapters_model_card_names_its_base_model(tiny_model_dir, run_a):
    """TRL's card said "fine-tuned version of [None](https://huggingface.co/None)" for any base on disk."""
    card = (run_a / "out" / "README.md").read_text()
    assert "None" not in card and str(tiny_model_dir) in card and "alpaca-lora generate adapter=" in card


def test_overwrite_removes_the_previous_runs_tensorboard_logs(tiny_model_dir, run_a, tmp_path):
    out = copy_of(run_a, tmp_path)
    (out / "runs" / "Dec01_10-00-00_old").mkdir(parents=True)
    (out / "runs" / "Dec01_10-00-00_old" / "events.out.tfevents.1.old").write_bytes(b"old")
    main(again(tiny_model_dir, run_a, tmp_path, "max_steps=1", "warmup=0", "overwrite=true"))
    assert not (out / "runs" / "Dec01_10-00-00_old").exists()


# --- max_steps and the learning-rate schedule -------------------------------------------------------------

SHORT_RUNS = [
    # max_steps=1 with the demo's warmup 0.05: one warmup step, taken at learning rate 0; trained nothing, then
    # "every LoRA B weight is zero" after the run, and the output directory refused a rerun.
    pytest.param(["max_steps=1", "warmup=0.05"], "key 'warmup': 0.05 of max_steps=1 is 1 warmup step", id="1-step"),
    pytest.param(["max_steps=10", "warmup=10"], "key 'warmup': 10 warmup steps", id="warmup-steps"),
    # max_steps=0 trained one step and exited 0 (the dry run showed max_steps: 0 beside num_train_epochs: 3.0)
    pytest.param(["max_steps=0"], "key 'max_steps' must be -1 (train num_epochs) or at least 1", id="0-steps"),
    pytest.param(["max_steps=-2"], "key 'max_steps' must be -1 (train num_epochs) or at least 1", id="-2-steps"),
]


@pytest.mark.parametrize("overrides, message", SHORT_RUNS)
def test_a_run_that_cannot_train_is_refused_before_anything_loads(tmp_path, capsys, overrides, message):
    args = tiny_run(tmp_path / "no-model-here", tmp_path, *overrides)
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    assert message in last_error(capsys)
    assert not (tmp_path / "out").exists()  # nothing claimed: a corrected rerun needs no overwrite=true
    with pytest.raises(SystemExit):
        main([*args, "dry_run=true"])
    assert message in last_error(capsys)


def test_an_epoch_run_shorter_than_its_warmup_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    """With max_steps=-1 the number of steps is known once the data is (before the model loads): 24 records packed
    into rows of 64 tokens, 4 rows a step, one epoch."""
    args = tiny_run(tokenizer_only(tiny_model_dir, tmp_path), tmp_path, "num_epochs=1", "warmup=100")
    with pytest.raises(SystemExit):
        main(args)
    assert re.search(r"key 'warmup': 100 warmup steps, not fewer than the run's \d+ steps", last_error(capsys))


class LearningRates(TrainerCallback):
    def __init__(self):
        self.rates = {}

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.rates[state.global_step] = lr_scheduler.get_last_lr()[0]


@pytest.mark.slow
def test_resuming_with_a_larger_max_steps_follows_the_new_schedule(tiny_model_dir, tmp_path):
    """A cosine schedule over 4 steps has decayed by step 4; resumed with max_steps=8, the rate must be the
    8-step schedule's (documented in docs/train.md), not the old one's near-zero tail."""
    import math

    main(tiny_run(tiny_model_dir, tmp_path, "max_steps=4", "save_steps=4", "lr_scheduler=cosine"))
    rates = LearningRates()
    cfg = load_config(tiny_run(tiny_model_dir, tmp_path, "max_steps=8", "lr_scheduler=cosine",
                               "resume_from_checkpoint=true"))
    train(cfg, resolve_runtime(cfg), callbacks=[rates])
    assert sorted(rates.rates) == [5, 6, 7, 8]
    for step, rate in rates.rates.items():
        assert rate == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * step / 8)), rel=1e-6), step


def test_resume_without_a_checkpoint_is_refused_before_the_data_is_read(tmp_path, capsys):
    """The data was downloaded and tokenized before the missing checkpoint was noticed."""
    args = tiny_run(tmp_path / "no-model-here", tmp_path, "resume_from_checkpoint=true")
    (tmp_path / "data.json").unlink()  # reading it would fail first
    with pytest.raises(SystemExit):
        main(args)
    error = last_error(capsys)
    assert "key 'resume_from_checkpoint'" in error and "no checkpoint-* yet" in error


def test_a_validation_split_the_data_cannot_hold_names_the_key_and_the_fix_before_the_model_loads(
        tiny_model_dir, tmp_path, capsys):
    """The recipes' val_set_size=2000 (Stanford's 2,000 of 52K) against any set of one's own under 2,000 rows."""
    args = tiny_run(tokenizer_only(tiny_model_dir, tmp_path), tmp_path, "val_set_size=2000")
    with pytest.raises(SystemExit):
        main(args)
    error = last_error(capsys)
    assert error.startswith(f"error: key 'val_set_size': {tmp_path / 'data.json'}: ") and "24 rows" in error
    assert "val_set_size=0.05" in error
