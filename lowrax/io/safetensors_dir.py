"""Streaming reads from an HF model directory's safetensors files.

Handles a single `model.safetensors` and sharded checkpoints with a
`model.safetensors.index.json`. Tensors are read one at a time through
memory-mapped `safe_open` handles, so the whole model is never held twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from lowrax.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsDir:
    """Lazy access to every tensor of an HF checkpoint directory, by key."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {key: self.directory / name for key, name in weight_map.items()}
        elif single.exists():
            with safe_open(single, framework="numpy") as f:
                self._file_of = {key: single for key in f.keys()}
        else:
            raise CheckpointError(
                f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}; "
                "expected an HF model directory saved with safetensors"
            )
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _handle(self, key: str):
        path = self._file_of[key]
        if path not in self._handles:
            if not path.exists():
                raise CheckpointError(f"shard {path.name} (holding {key!r}) is missing from {self.directory}")
            self._handles[path] = safe_open(path, framework="numpy")
        return self._handles[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)
