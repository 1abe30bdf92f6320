"""Durable writes: a failed write leaves the old content, a held lock refuses a second holder, modes apply."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from securefl.core import durable
from securefl.core.durable import (
    append_durably,
    atomic_replacement,
    fsync_dir,
    lock_descriptor,
    lock_exclusive,
    temporary_sibling,
    write_atomically,
)


def test_write_atomically_replaces_the_content_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"old\n")
    write_atomically(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_sync_keeps_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"old\n")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk gone"):
        write_atomically(path, b"new\n")
    monkeypatch.undo()
    assert path.read_bytes() == b"old\n"
    assert not temporary_sibling(path).exists()


def test_a_write_that_raises_halfway_keeps_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    write_atomically(path, b"old")
    with pytest.raises(RuntimeError, match="killed"), atomic_replacement(path) as tmp:
        tmp.write_bytes(b"half of the ne")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert not tmp.exists()


def test_the_temporary_file_is_where_the_caller_names_it(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    with atomic_replacement(path, temporary=tmp_path / "last.tmp") as tmp:
        assert tmp == tmp_path / "last.tmp"
        tmp.write_bytes(b"checkpoint")
    assert path.read_bytes() == b"checkpoint" and not tmp.exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_the_mode_is_applied_even_over_a_stale_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.bin"
    stale = temporary_sibling(path)
    stale.write_bytes(b"left by a crash")
    stale.chmod(0o644)  # reopening keeps a file's mode; the secret must still not be world-readable
    write_atomically(path, b"secret", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"secret"


def test_append_durably_appends_every_byte_and_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    synced: list[int] = []
    real_fsync, real_write = os.fsync, os.write
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    # A short write (a signal, a full pipe) must be continued, not silently truncated.
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    append_durably(path, b"line 1\n")
    append_durably(path, b"line 2\n")
    assert path.read_bytes() == b"line 1\nline 2\n"
    assert len(synced) == 2

    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        append_durably(fd, b"line 3\n")
        os.fstat(fd)  # a descriptor given by the caller stays open
    finally:
        os.close(fd)
    assert path.read_bytes().endswith(b"line 3\n") and len(synced) == 3


def test_fsync_dir_is_best_effort(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "no such directory")  # nothing to sync; no error


@pytest.mark.skipif(durable.fcntl is None, reason="no advisory locks on this platform")
def test_a_second_lock_on_a_held_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    held = lock_exclusive(path)
    try:
        with pytest.raises(BlockingIOError):
            lock_exclusive(path)
        other = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                lock_descriptor(other)
        finally:
            os.close(other)
    finally:
        os.close(held)
    os.close(lock_exclusive(path))  # closing the descriptor released it
