"""Writing files that survive a crash: atomic replacement, durable appends, and one process per file.

Every record securefl keeps on disk (ledgers, checkpoints, the release record, replay records, keys) is
written through these few functions, so "on disk" means the same thing everywhere:

- :func:`write_atomically` / :func:`atomic_replacement`: write a temporary file next to the target, fsync
  it, rename it over the target, fsync the directory. A crash leaves the old content or the new, never half.
- :func:`append_durably`: append and fsync before returning (write-ahead: what a caller acts on after
  this returns is on disk first).
- :func:`fsync_dir`: make a rename or a new file's directory entry durable.
- :func:`lock_exclusive` / :func:`lock_descriptor`: an advisory lock that a second holder is refused
  (``BlockingIOError``) rather than made to wait; the caller says what the refusal means.

POSIX semantics; where a platform lacks them (Windows: no ``fcntl``, directories cannot be opened) the
lock and the directory fsync are skipped, as nothing else is possible there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX advisory locks; without them (Windows) a second holder is not detected.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "append_durably",
    "atomic_replacement",
    "fsync_dir",
    "lock_descriptor",
    "lock_exclusive",
    "temporary_sibling",
    "write_atomically",
]


def temporary_sibling(path: Path) -> Path:
    """``<name>.tmp`` in the same directory as ``path`` (a rename is atomic only within one file system)."""
    return path.with_name(path.name + ".tmp")


def fsync_dir(directory: str | Path) -> None:
    """Make the entries of ``directory`` (a file just created or renamed into it) durable.

    Best effort: where a directory cannot be opened or synced (Windows, some network file systems) there is
    nothing more to do, and the file's own content was already synced.
    """
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_replacement(path: str | Path, *, temporary: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; when the block ends normally, it replaces ``path`` durably.

    For writers that want a path rather than bytes (``torch.save``). The file is fsynced, renamed over
    ``path`` and the directory fsynced. If the block raises, the temporary file is removed and ``path`` is
    left as it was.

    Parameters
    ----------
    path : str or Path
        The file to replace (or create).
    temporary : Path, optional
        Where to write first; default :func:`temporary_sibling`. Must be in the same directory.
    """
    path = Path(path)
    tmp = temporary if temporary is not None else temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_atomically(path: str | Path, data: bytes, *, mode: int | None = None,
                     temporary: Path | None = None) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old content or the new, never a mix.

    Parameters
    ----------
    path : str or Path
        The file to replace (or create); its directory must exist.
    data : bytes
        The whole new content.
    mode : int, optional
        Permissions of the new file (e.g. ``0o600`` for a secret), set on the temporary file when it is
        created, so the content is never readable more widely for a moment. Default: the process's umask.
    temporary : Path, optional
        Where to write first; default ``<name>.tmp`` next to ``path``.
    """
    with atomic_replacement(path, temporary=temporary) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                # A temporary file left by a crash keeps its old permissions when reopened: set them again.
                os.fchmod(fd, mode)
            handle.write(data)


def append_durably(destination: int | str | Path, data: bytes) -> None:
    """Append ``data`` and fsync it before returning.

    Parameters
    ----------
    destination : int, str or Path
        An open descriptor (opened with ``O_APPEND``; it stays open), or a file to open for appending
        (created if missing).
    data : bytes
        What to append, whole: a short write is continued until every byte is written.
    """
    if isinstance(destination, int):
        _write_all_and_sync(destination, data)
        return
    fd = os.open(destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        _write_all_and_sync(fd, data)
    finally:
        os.close(fd)


def _write_all_and_sync(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def lock_descriptor(fd: int) -> None:
    """Take an exclusive advisory lock on the open file ``fd`` without waiting.

    The lock lasts until the descriptor is closed (the OS releases it if the process dies).

    Raises
    ------
    BlockingIOError
        If another open file (in this or another process) holds the lock.
    """
    if fcntl is None:  # pragma: no cover
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def lock_exclusive(path: str | Path, *, mode: int = 0o644) -> int:
    """Open (creating it with ``mode``) and lock ``path``; return the descriptor that holds the lock.

    Raises
    ------
    BlockingIOError
        If the file is already locked; nothing stays open.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        lock_descriptor(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd
