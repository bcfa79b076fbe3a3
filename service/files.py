"""Atomic file writes (readers see the old file or the whole new one, never half of it), and
scratch folders that outlive no process for long."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write and check; flushed to disk and renamed onto
    ``path`` when the block ends normally, removed when it raises. The folder is created if
    needed. ``mode``: the file's permissions; by default those of the file it replaces, else
    what the umask allows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as written:  # on disk before it takes the name: never an empty file
            os.fsync(written.fileno())
        os.chmod(tmp, mode)  # mkstemp made it 0600; after the read, which a mode may forbid
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask. Reading it means setting it for a moment: not for a process whose
    other threads create files meanwhile (the service passes ``mode``)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def memory_root() -> Path | None:
    """``/dev/shm`` where the process may write there, else None (the temporary directory).

    Files of memory, which no full disk takes from under a memory map: prometheus-client maps its
    multiprocess files sparse, and a page first written on a full disk raised SIGBUS in every
    worker, again after each restart, while uploads spooled to the temporary directory filled it.
    """
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


@contextmanager
def scratch_folder(prefix: str, root: Path | None = None) -> Iterator[tuple[Path, int]]:
    """A new folder ``<prefix>…`` in ``root`` (by default the temporary directory), removed when
    the block ends; with the descriptor that holds its lock.

    A process killed with -9 cannot remove its folder, so each folder is locked (``flock``) while
    it is in use, and every call first removes the unlocked folders of the same prefix. The lock
    lasts while any process holds the descriptor: children that use the folder get it too, so it
    outlives a killed parent for as long as they run. A folder is locked before it gets its name,
    so a start beside another never takes the other's new folder for an abandoned one.
    """
    temporary = Path(tempfile.gettempdir())
    root = root or temporary
    for old in {*root.glob(f"{prefix}*"), *temporary.glob(f"{prefix}*")}:  # earlier versions used the latter
        _remove_if_abandoned(old)
    hidden = Path(tempfile.mkdtemp(prefix=f".{prefix}", dir=root))
    folder = root / hidden.name[1:]
    fd = _locked_as(hidden, folder)
    try:
        yield folder, fd
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def remade_folder(folder: Path) -> int:
    """Makes ``folder`` again after it was removed, as ``scratch_folder`` makes one (private,
    locked before it gets its name, so no start beside this one takes it for abandoned); the
    descriptor that holds its lock."""
    return _locked_as(Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent)), folder)


def _locked_as(hidden: Path, folder: Path) -> int:
    """``hidden``, a new folder, locked and then renamed ``folder``; the descriptor that holds
    its lock. If it cannot be, it is removed."""
    fd = os.open(hidden, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        hidden.rename(folder)
    except BaseException:
        os.close(fd)
        shutil.rmtree(hidden, ignore_errors=True)
        raise
    return fd


def _remove_if_abandoned(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # not a folder, gone meanwhile, or not ours to read
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # locked: its process is alive
        pass
    else:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)
