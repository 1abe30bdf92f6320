"""A run directory's checkpoint and its lock: what lets a run stop and resume, and only one process write it.

The checkpoint is written atomically (a crash leaves the previous round's checkpoint or this one) and read
without running any code it might hold; the lock keeps a second process (a second ``--resume``) out of a run
directory while one writes to it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from securefl.core.durable import atomic_replacement, lock_exclusive

__all__ = ["CHECKPOINT", "RUN_LOCK", "RunDirError", "load_checkpoint", "lock_run_dir", "save_atomically"]

#: The coordinator's checkpoint, relative to the run directory.
CHECKPOINT = "checkpoints/last.pt"
#: The lock file of a run directory (it holds the pid of the process using the directory).
RUN_LOCK = ".lock"


class RunDirError(ValueError):
    """The output directory cannot be used as asked (e.g. it holds a run and --resume was not given)."""


def lock_run_dir(out: Path) -> int:
    """Hold ``out`` for this process until the returned descriptor is closed (the OS releases it if the process
    dies). Two processes writing one run directory would interleave its metrics and checkpoints; a private run's
    ledgers lock themselves, but a run without DP has nothing else to stop a second ``--resume``."""
    try:
        fd = lock_exclusive(out / RUN_LOCK)
    except BlockingIOError:
        holder = "unknown"
        with contextlib.suppress(OSError), open(out / RUN_LOCK, "rb") as handle:
            holder = handle.read(32).decode(errors="replace").strip() or "unknown"
        raise RunDirError(f"{out} is in use by another process (pid {holder}); wait for it to finish, or choose "
                          "another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def save_atomically(state: Mapping[str, Any], path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a crash leaves the old file or the new, never half."""
    # torch names the archive inside the file after the file it writes ("last.tmp" -> "last/data.pkl"), so the
    # temporary file keeps the target's stem, and a checkpoint's bytes do not depend on how it was written.
    with atomic_replacement(path, temporary=path.with_suffix(".tmp")) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without running any code it holds.

    A checkpoint is a pickle, and a full unpickler calls whatever the file names (a crafted ``last.pt``
    would run code on ``--resume``, before anything is validated). ``weights_only=True`` accepts only
    tensors, plain containers and numbers, and the classes allowed here, which is all securefl saves.
    """
    from securefl.core.sealed import SealedTensor
    from securefl.protocols.base import GlobalUpdate

    try:
        # The classes a checkpoint holds besides plain values (the server's update log, with sealed fields):
        # frozen dataclasses of tensors, bytes and plain values, whose loading calls no code of the file's choice.
        with torch.serialization.safe_globals([GlobalUpdate, SealedTensor]):
            state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message quotes what the file asked for; say what it means instead.
        what = ("holds objects other than tensors, numbers, strings and containers (loading them could run "
                "code)" if "Weights only load failed" in str(exc) else "is corrupt or truncated")
        raise RunDirError(f"{path}: not a checkpoint securefl wrote: it {what}; refusing to load it (restore the "
                          "checkpoint from a copy you trust)") from None
    except Exception as exc:  # noqa: BLE001 - any other failure means a corrupt file
        raise RunDirError(f"{path}: checkpoint is corrupt or truncated ({type(exc).__name__}); "
                          "refusing to start over silently") from None
    if not isinstance(state, dict):
        raise RunDirError(f"{path}: not a securefl checkpoint (it holds a {type(state).__name__}, not a mapping); "
                          "refusing to resume from it")
    return state
