"""Write a directory all at once: into a temporary sibling, renamed into place when complete."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

from lowrax.errors import LowraxError, OutputExistsError


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain `open`/`mkdir` would have.

    `tempfile.mkdtemp` makes owner-only directories, and some writers (safetensors)
    create owner-only files; renamed into place they would stay unreadable to others.
    """
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


REPLACED = "replaced"  # the staging suffix of a directory being replaced, kept until its successor is in place
MARKER = ".lowrax-output"  # in every directory lowrax writes whole: only such a directory may be replaced


def staging_prefix(name: str) -> str:
    """Staging names carry host and pid, so a later writer can tell a crashed writer's leftover from a live one."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_staging(directory: str | Path) -> list[Path]:
    """Delete staging leftovers in `directory` of writers on this host that are no longer running (a kill
    during a write); returns what was removed."""
    directory, removed = Path(directory), []
    if not directory.is_dir():
        return removed
    host = socket.gethostname()
    for entry in sorted(directory.iterdir()):
        owner = re.fullmatch(rf"\.(.+)\.tmp-{re.escape(host)}-(\d+)-[^/]+", entry.name)
        if owner is None or _running(int(owner.group(2))):
            continue
        target = directory / owner.group(1)
        if entry.name.endswith(REPLACED) and not target.exists():
            os.replace(entry, target)  # killed between its two renames: the old directory goes back
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def check_replaceable(out_dir: Path, inputs: tuple = ()) -> None:
    """Refuse to replace `out_dir` when it is (or holds) one of the command's `inputs`, or is not a
    directory lowrax wrote: --overwrite never deletes what lowrax did not make."""
    if out_dir.is_file() or (out_dir.is_symlink() and not out_dir.is_dir()):
        raise LowraxError(f"{out_dir} is a file, not a directory; choose another output path")
    resolved = out_dir.resolve()
    for source in inputs:
        if source is None or not Path(source).exists():  # not a path ("embedded", a hub-style name)
            continue
        source = Path(source).resolve()
        if source == resolved or resolved in source.parents:
            raise LowraxError(f"{out_dir} holds this command's input {source}; write the output somewhere else")
        if source in resolved.parents and out_dir.is_dir() and any(out_dir.iterdir()):
            raise LowraxError(f"{out_dir} is part of this command's input {source}; write the output somewhere else")
    if is_foreign(out_dir):
        raise LowraxError(f"{out_dir} is not empty and was not written by lowrax (it has no {MARKER} marker); "
                          "lowrax replaces only its own outputs: choose another directory or empty this one yourself")


def check_output(out_dir: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """Whether a command may write `out_dir`, checked before it loads anything: not a file, not one of its
    `inputs` or a folder holding one, and when non-empty only with overwrite and only if lowrax wrote it."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        check_replaceable(out_dir, inputs)  # an input or a user's directory: its own error, no --overwrite hint
        raise OutputExistsError(out_dir)
    check_replaceable(out_dir, inputs)
    return out_dir


def is_foreign(directory: Path) -> bool:
    """A non-empty directory without lowrax's marker: someone else's files."""
    return directory.is_dir() and any(directory.iterdir()) and not (directory / MARKER).exists()


def write_directory(out_dir: str | Path, fill: Callable[[Path], None], overwrite: bool = False,
                    inputs: tuple = ()) -> Path:
    """Call `fill(staging_dir)` and move the result to `out_dir`.

    A crash inside `fill` leaves nothing behind (and a kill leaves a staging directory that the next
    write removes); an existing non-empty `out_dir` is replaced only with overwrite=True, and only
    when lowrax wrote it and it holds none of `inputs`. The result's modes follow the umask.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite, inputs)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(parent)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir.name), dir=parent))
    except OSError as e:
        raise unwritable(out_dir, e) from None
    try:
        fill(staging)
        (staging / MARKER).write_text("written by lowrax; `--overwrite` may replace this directory\n")
        follow_umask(staging)
        if out_dir.exists():
            # Two renames, so a kill at any point leaves the old directory or the new one in place (or the
            # old one under its backup name, which the next write to this parent puts back).
            backup = parent / (staging_prefix(out_dir.name) + REPLACED)
            os.replace(out_dir, backup)
            os.replace(staging, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise unwritable(out_dir, e) from None
        raise
    return out_dir


def unwritable(path: Path, error: OSError) -> LowraxError:
    """One line for a write that the file system refused (full, read-only, no permission)."""
    where = error.filename or path
    reason = error.strerror or str(error)
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        reason = "a file stands where a folder is needed"
    return LowraxError(f"cannot write {path}: {reason} ({where}); nothing was left half-written")


def write_text(path: str | Path, text: str) -> Path:
    """Replace a file's text all at once: a crash leaves the old file or the new one, never half of it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=staging_prefix(path.name), dir=path.parent)
    except OSError as e:
        raise unwritable(path, e) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(staging, 0o666 & ~current_umask())
        os.replace(staging, path)
    except BaseException as e:
        Path(staging).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise unwritable(path, e) from None
        raise
    return path
