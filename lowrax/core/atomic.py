"""Write a directory all at once: into a temporary sibling, renamed into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from lowrax.errors import OutputExistsError


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


def write_directory(out_dir: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `fill(staging_dir)` and move the result to `out_dir`.

    A crash inside `fill` leaves nothing behind; an existing non-empty
    `out_dir` is replaced only with overwrite=True. The result's modes follow the umask.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fill(staging)
        follow_umask(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def write_text(path: str | Path, text: str) -> Path:
    """Replace a file's text all at once: a crash leaves the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(staging, 0o666 & ~current_umask())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path
