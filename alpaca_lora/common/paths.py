"""Where downloads and converted models are cached, and how files are written safely."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_dir(*parts: str) -> Path:
    """``$ALPACA_LORA_CACHE`` or ``$XDG_CACHE_HOME/alpaca_lora`` (default ``~/.cache/alpaca_lora``)."""
    root = os.environ.get("ALPACA_LORA_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "alpaca_lora")
    path = Path(root, *parts).expanduser().absolute()  # the same place from any working directory
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks (weights can be gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes through a temporary file in the same directory and renames it into place."""
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a hidden temporary file's path beside ``target`` (same suffix, so writers that go by it, such as
    matplotlib's ``savefig``, still do), renamed onto ``target`` when the block ends well, with the mode a plain
    write would have given it; removed when it does not."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(finished: str | Path, target: str | Path) -> None:
    """Renames a finished temporary file (or directory) onto ``target``, first giving it the mode a plain write
    would have: an existing file's own mode, else 0666 (0777 for directories) less the umask."""
    finished, target = Path(finished), Path(target)
    if finished.is_file() and target.is_file():
        os.chmod(finished, target.stat().st_mode & 0o7777)
    else:
        plain_permissions(finished)
    os.replace(finished, target)


@contextmanager
def atomic_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yields a hidden temporary directory beside ``target``, renamed into place when the block ends
    well and removed when it does not, so ``target`` is never half-written. An existing ``target`` is
    replaced only with ``replace``; leftovers of a writer that was killed are removed first (the
    temporary directory's name carries its writer's process id). What appears has the modes plain
    writes would have given it (the temporary directory is owner-only, and so is whatever safetensors writes)."""
    target = Path(target)
    with scratch_directory(target) as tmp:
        yield tmp
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(f"{target} exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            publish(tmp, target)
            _remove(old)
        else:
            publish(tmp, target)


@contextmanager
def scratch_directory(target: str | Path) -> Iterator[Path]:
    """A hidden working directory beside ``target`` (on its file system, so what is made there is renamed into
    place), removed when the block ends (if still there); a killed writer's are removed first, a live one's left
    alone (the name carries its writer's process id)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        if not _alive(stale.name.removeprefix(f".{target.name}.partial-").split("-", 1)[0]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-{os.getpid()}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plain_permissions(*paths: str | Path) -> None:
    """Gives each path, and everything under a directory, the mode a plain write would have: 0666 (0777 for
    directories and executables) less the umask. For what libraries write owner-only whatever the umask
    (safetensors 0.8 writes every file 0600), so that a serving account or a non-root container can read it."""
    for path in map(Path, paths):
        for item in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else [])]:
            if not item.is_symlink():
                os.chmod(item, _plain_mode(item))


def _plain_mode(path: Path) -> int:
    executable = path.is_dir() or path.stat().st_mode & 0o100
    return (0o777 if executable else 0o666) & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (else set and restored at once, to the
    stricter 077 meanwhile, so a file another thread creates in between is never more open than asked)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    """A replaced output, whatever it was: a directory, a file or a link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def cannot_write(target: str | Path) -> str | None:
    """Why ``target`` could not be created, or None: the nearest existing folder above it is asked by making (and
    removing) an entry there, since modes, read-only mounts and ACLs all answer only then (root ignores modes)."""
    folder = Path(target).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        Path(tempfile.mkdtemp(dir=folder, prefix=".write-check-")).rmdir()
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror or exc})"
    return None


def _alive(pid: str) -> bool:
    """Whether the process that made a temporary directory still runs (on this machine)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
