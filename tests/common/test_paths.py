"""Atomic writes: a directory appears whole or not at all, and two writers never destroy each other's work."""

import os
import subprocess
import sys

import pytest

from alpaca_lora.common.paths import atomic_directory


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("whole")
    assert (target / "weights").read_text() == "whole"
    with pytest.raises(FileExistsError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("other")
    assert (target / "weights").read_text() == "whole"


def test_a_second_writer_leaves_a_live_writers_work_alone(tmp_path):
    """Two processes converting the same model into the cache at once: the second must not delete the
    first one's temporary directory (it did: the first then failed on its rename)."""
    target = tmp_path / "model"
    with atomic_directory(target, replace=True) as first:
        (first / "weights").write_text("first")
        subprocess.run([sys.executable, "-c", "import sys; from alpaca_lora.common.paths import atomic_directory\n"
                        f"with atomic_directory({str(target)!r}, replace=True) as t: (t / 'weights').write_text('2')"],
                       check=True, env={**os.environ})
        assert (first / "weights").read_text() == "first"
    assert (target / "weights").read_text() == "first"


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".model.partial-{dead.stdout.strip()}-abc"
    leftover.mkdir()
    with atomic_directory(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("x")
    assert not leftover.exists()
