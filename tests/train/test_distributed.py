"""One command, several processes: ``python -m alpaca_lora.train ... nproc=2`` re-launches itself
through torch.distributed.run. On CPU, HF Trainer and accelerate run the ranks as DDP over gloo,
not FSDP: these tests prove the launch path, the batch arithmetic, the data sharding and the single
writer, not parameter sharding (which needs GPUs; see the README)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from alpaca_lora.common.errors import UserError
from alpaca_lora.train.config import load_config
from alpaca_lora.train.launcher import relaunch_if_needed, under_launcher
from alpaca_lora.train.plan import check_memory, plan_run
from alpaca_lora.train.runtime import resolve_runtime

TESTS = Path(__file__).resolve().parent
RECORDS = [{"instruction": "Repeat the number.", "input": str(i), "output": f"number {i} {i}"} for i in range(16)]


def run_two_ranks(tmp_path, tiny_model_dir, *overrides):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    (tmp_path / "shards").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
           "SHARD_RECORD_DIR": str(tmp_path / "shards")}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    command = [sys.executable, "-m", "alpaca_lora.train", f"model={tiny_model_dir}", f"data={data}",
               f"output_dir={tmp_path / 'out'}", "device=cpu", "nproc=2", "batch_size=4", "micro_batch_size=1",
               "max_steps=4", "max_length=64", "report_to=[]", "val_set_size=0", "group_by_length=false",
               "callbacks=[shard_recorder:ShardRecorder]", "save_steps=100", *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def check_ranks(tmp_path, log, packed: bool):
    assert "[alpaca-lora] 2 processes: re-launching through torch.distributed.run" in log
    for rank in (0, 1):  # both ranks agree on the world size and the global batch
        assert f"rank {rank} of 2: global batch 4 = micro batch 1 x accumulation 2 x 2 ranks" in log
    shards = [json.loads((tmp_path / "shards" / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["world_size"] for s in shards] == [2, 2]
    first, second = ({tuple(r) for r in s["examples"]} for s in shards)
    assert first and second and not first & second and len(first | second) == 16  # every example, on one rank
    if not packed:  # one example per row: the rows, and so the examples, halve
        assert len(first) == len(second) == 8


@pytest.mark.slow
def test_lora_on_two_cpu_ranks_from_one_command(tmp_path, tiny_model_dir):
    log = run_two_ranks(tmp_path, tiny_model_dir, "recipe=qlora")
    check_ranks(tmp_path, log, packed=True)
    assert log.count("[alpaca-lora] adapter:") == 1  # exactly one rank writes the outputs
    assert log.count("[alpaca-lora] data:") == 1 and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train"]["train_loss"] > 0
    assert (tmp_path / "out" / "checkpoint-4" / "training_config.yaml").is_file()  # sealed once both ranks wrote


@pytest.mark.slow
def test_full_fsdp_recipe_launches_and_writes_one_consolidated_model(tmp_path, tiny_model_dir):
    log = run_two_ranks(tmp_path, tiny_model_dir, "recipe=full_fsdp")
    check_ranks(tmp_path, log, packed=False)
    assert "no FSDP sharding (it needs GPUs): several CPU ranks run data-parallel (DDP over gloo)" in log
    assert log.count("[alpaca-lora] model:") == 1
    out = tmp_path / "out"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in trained.named_parameters() if not p.equal(dict(base.named_parameters())[n])]
    assert len(changed) == len(list(base.parameters()))  # a full fine-tune: every tensor moved


def test_one_process_when_there_is_nothing_to_spread_over(tiny_model_dir, monkeypatch, capsys):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(["recipe=qlora", f"model={tiny_model_dir}", "device=cpu"])
    relaunch_if_needed(cfg, resolve_runtime(cfg), [])
    assert "one process: no GPU (nproc=N starts N CPU ranks)" in capsys.readouterr().err
    # a batch that N processes cannot share is refused with the configuration, before anything starts
    with pytest.raises(UserError, match=r"key 'batch_size' must be a multiple of micro_batch_size x processes "
                                        r"\(2 x 2\)"):
        load_config(["recipe=qlora", f"model={tiny_model_dir}", "device=cpu", "nproc=2", "batch_size=6",
                     "micro_batch_size=2"])


def test_launched_ranks_run_as_they_are_and_srun_tasks_are_adopted(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores what under_launcher() sets
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not under_launcher()
    monkeypatch.setenv("RANK", "3")  # torchrun / accelerate launch
    assert under_launcher()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(UserError, match="export MASTER_ADDR and MASTER_PORT"):
        under_launcher()
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert under_launcher()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")


def test_train_stops_before_loading_weights_when_the_plan_says_oom(capsys):
    def check(cfg, gpu_bytes=24 * 1024**3):  # as train does on a GPU: the run's plan, then the check
        cfg, _, memory_plan = plan_run(cfg, cfg.model, 1, gpu_bytes)
        check_memory(memory_plan, cfg, gpu_bytes)

    cfg = load_config(["recipe=qlora_fsdp", "model=llama-2-70b", "fsdp=", "micro_batch_size=1"])
    with pytest.raises(UserError, match="the memory plan above predicts out-of-memory"):
        check(cfg)  # 70B in 4-bit on one 24 GB GPU: no
    assert "DOES NOT FIT in 24.0 GiB" in capsys.readouterr().err
    forced = load_config(["recipe=qlora_fsdp", "model=llama-2-70b", "fsdp=", "force=true"])
    check(forced)  # warned, not stopped
    assert "going on because force=true" in capsys.readouterr().err
    check(load_config(["recipe=qlora", "model=llama-2-7b"]))  # fits: silent
    assert capsys.readouterr() == ("", "")
