"""One process per run directory: an exclusive lock held while a run (or an import) writes there.

The lock is an `flock` on `.lowrax-lock` inside the directory, so the kernel releases it when the
holder exits, even after kill -9: a crashed run never leaves a directory locked. The file holds
the holder's pid for the error a second process gets; `release()` empties it, so a pid found there
by the next holder is that of a process that was killed (by the out-of-memory killer, say) before it
could say anything.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lowrax.core.atomic import MARKER, is_foreign, remove_stale_staging, unwritable
from lowrax.errors import LowraxError

LOCK_FILE = ".lowrax-lock"


class RunLock:
    """Held from `lock_run_directory` until `release()` (or the process's end)."""

    def __init__(self, directory: Path, fd: int, killed_pid: int | None = None):
        self.directory, self._fd = directory, fd
        self.killed_pid = killed_pid  # the previous holder, when it ended without releasing

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # ended knowingly: the next holder finds no pid
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_directory(directory: str | Path, key: str = "train.output_dir") -> RunLock:
    """Claim `directory` for a run: create it (with lowrax's marker), refuse a directory of someone
    else's files or one another process is using, and clear what killed writers left there."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LowraxError(f"{key} {directory} is a file; expected a directory for the run")
    if is_foreign(directory) and not (directory / "config.yaml").exists():  # a run that predates the marker is one
        raise LowraxError(f"{key} {directory} holds files that are not a lowrax run (no config.yaml or {MARKER}); "
                          "choose a new or empty directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER).touch()
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise unwritable(directory, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LowraxError(f"{key} {directory} is in use by another lowrax process (pid {holder}); wait for it to "
                          f"finish or choose another {key}") from None
    previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    remove_stale_staging(directory)
    return RunLock(directory, fd, int(previous) if previous.isdigit() else None)
