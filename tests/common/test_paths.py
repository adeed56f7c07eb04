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


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    """The process umask for one test (restored after): atomic writes must end as a plain write would."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_atomic_writes_end_with_the_permissions_a_plain_write_has(tmp_path, umask):
    """A serving account or a non-root container must read what a run wrote: temporary files and
    directories are created owner-only (0600/0700), so they must be given the plain modes before the rename."""
    import torch
    from safetensors.torch import save_file

    from alpaca_lora.common.paths import atomic_path, atomic_write_text

    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    file_mode, dir_mode = _mode(tmp_path / "plain.txt"), _mode(tmp_path / "plain")
    assert (file_mode, dir_mode) == (0o666 & ~umask, 0o777 & ~umask)

    atomic_write_text(tmp_path / "metrics.json", "{}")
    with atomic_path(tmp_path / "loss.png") as tmp:
        tmp.write_bytes(b"png")
    with atomic_directory(tmp_path / "merged") as tmp:
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(1)}, tmp / "model.safetensors")  # safetensors 0.8 writes 0600 whatever the umask
        (tmp / "sub" / "config.json").write_text("{}")
    assert _mode(tmp_path / "metrics.json") == _mode(tmp_path / "loss.png") == file_mode
    assert _mode(tmp_path / "merged") == _mode(tmp_path / "merged" / "sub") == dir_mode
    assert _mode(tmp_path / "merged" / "model.safetensors") == _mode(tmp_path / "merged/sub/config.json") == file_mode


def test_an_atomic_rewrite_keeps_the_files_own_mode(tmp_path, umask):
    """Writing over an existing file in place keeps its mode: so does the rename that replaces it."""
    from alpaca_lora.common.paths import atomic_write_text

    target = tmp_path / "votes.csv"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert _mode(target) == 0o640 and target.read_text() == "new"


def test_replacing_a_file_with_a_directory_leaves_nothing_behind(tmp_path):
    """``merge output=EXISTING_FILE overwrite=true`` left a hidden ``.EXISTING_FILE.old-PID`` beside it."""
    target = tmp_path / "merged"
    target.write_text("a file in the way")
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "weights").write_text("w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"] and (target / "weights").read_text() == "w"


def _mode(path) -> int:
    return path.stat().st_mode & 0o777
