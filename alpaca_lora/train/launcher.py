"""One command from a laptop to a cluster: how many processes a run has, and starting them.

Not under a launcher, a run on N > 1 GPUs (or with ``nproc=N``) re-runs its own command through
``torch.distributed.run`` with N processes. Under torchrun, ``accelerate launch`` or ``srun`` (one task
per GPU) it runs as the launched rank.
"""

from __future__ import annotations

import os
import subprocess
import sys

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.common.logs import get_logger

logger = get_logger(__name__)


def under_launcher() -> bool:
    """Started by torchrun, accelerate launch or srun (one task per GPU): run as that rank."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        for ours, slurm in (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS"), ("LOCAL_RANK", "SLURM_LOCALID")):
            os.environ[ours] = os.environ[slurm]
        if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            raise ConfigError("srun started several tasks: export MASTER_ADDR and MASTER_PORT "
                              "(see the recipes' slurm/full_fsdp.sbatch)")
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


def planned_world_size(nproc: int | None, device: str) -> int:
    """The processes this command runs as: a launcher's ``WORLD_SIZE`` under a launcher, else
    ``nproc``, else one per visible GPU, else a ``WORLD_SIZE`` from the environment, else 1.
    A dry run plans for exactly what the same command would start."""
    if under_launcher():
        return int(os.environ.get("WORLD_SIZE", "1"))
    if nproc:
        return nproc
    if device in ("cuda", "auto"):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return torch.cuda.device_count()
    return int(os.environ.get("WORLD_SIZE", "1"))


def relaunch_if_needed(cfg, runtime, argv: list[str]) -> None:
    """On N > 1 processes and not under a launcher, re-runs this command through
    ``torch.distributed.run`` and exits with its status; otherwise says why one process."""
    import torch

    if under_launcher():
        return
    count = cfg.nproc or (torch.cuda.device_count() if runtime.device == "cuda" else 1)
    if count == 1:
        why = "nproc=1" if cfg.nproc else "one GPU" if runtime.device == "cuda" else \
            "no GPU (nproc=N starts N CPU ranks)"
        logger.info(f"one process: {why}")
        return
    logger.info(f"{count} processes: re-launching through torch.distributed.run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}",
               "-m", "alpaca_lora.train", *argv]
    raise SystemExit(subprocess.call(command))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
