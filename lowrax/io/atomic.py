"""Write a directory all at once: into a temporary sibling, renamed into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_directory(out_dir: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `fill(staging_dir)` and move the result to `out_dir`.

    A crash inside `fill` leaves nothing behind; an existing non-empty
    `out_dir` is replaced only with overwrite=True.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fill(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
