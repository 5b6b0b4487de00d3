"""One parse of a GGUF file per process.

`gguf.GGUFReader` decodes every metadata field in Python when it opens a file: for
SmolLM2's 49k-token vocabulary and merges that is about 6 s on the 2-core CPU. A
command that loads both the weights and the tokenizer from the same file (`lowrax
train` on the embedded model) would pay it twice; the reader is read-only (a memory
map), so it is shared, keyed by the file's identity (path, size, modification time).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def open_gguf(path: str | Path):
    """The (shared) `gguf.GGUFReader` of this file."""
    stat = os.stat(path)
    return _reader(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _reader(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path)
