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
from safetensors.numpy import load_file, save_file

from lowrax.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsDir:
    """Lazy access to every tensor of an HF checkpoint directory, by key. Every problem with its files
    (a damaged index, a shard outside the directory, a truncated or foreign file, NaN weights) is a
    CheckpointError naming the file."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.exists():
            self._file_of = {key: self._shard(index, key, name) for key, name in read_weight_map(index).items()}
        elif single.exists():
            self._file_of = {key: single for key in self._open(single).keys()}
        else:
            raise CheckpointError(
                f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}; "
                "expected an HF model directory saved with safetensors"
            )
        self._handles: dict[Path, object] = {}

    def _shard(self, index: Path, key: str, name) -> Path:
        """A shard's path, confined to the model directory (an index naming ../../etc/passwd is refused)."""
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{index}: the shard of {key!r} is {name!r}; shard names must be file names "
                                  "inside the model directory")
        return self.directory / name

    def _open(self, path: Path):
        try:
            return safe_open(path, framework="numpy")
        except Exception as e:  # SafetensorError, OSError: truncated, empty, not safetensors at all
            raise unreadable(path, e) from None

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _handle(self, key: str):
        path = self._file_of[key]
        if path not in self._handles:
            if not path.exists():
                raise CheckpointError(f"shard {path.name} (holding {key!r}) is missing from {self.directory}")
            self._handles[path] = self._open(path)
        return self._handles[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        try:
            tensor = self._handle(key).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:  # a header that promises more bytes than the file holds
            raise CheckpointError(f"{self._file_of[key]}: tensor {key!r} cannot be read ({type(e).__name__}: "
                                  f"{str(e)[:200]}); the file is truncated or damaged") from None
        check_finite(tensor, key, self._file_of[key])
        return tensor


def read_json_file(path: Path, expected: str):
    """A JSON file's content, or a CheckpointError naming the file and what was expected of it."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); expected {expected}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None


def read_tensor_file(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file (an adapter's), each checked finite; errors name the file."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # SafetensorError, OSError
        raise unreadable(path, e) from None
    for key, tensor in tensors.items():
        check_finite(tensor, key, path)
    return tensors


def unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file ({type(error).__name__}: {str(error)[:200]}); "
                           "it is truncated, damaged or of another format")


def read_weight_map(index: Path) -> dict:
    """An index file's weight_map {tensor key: shard file name}, or a CheckpointError naming the file."""
    content = read_json_file(index, "safetensors' index file")
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard files, got "
                              f"{type(weight_map).__name__}")
    return weight_map


def check_finite(tensor: np.ndarray, key: str, path) -> None:
    """Refuse NaN or infinite weights by name: training on them gives NaN from the first step."""
    if tensor.dtype.kind == "f" or tensor.dtype.name == "bfloat16":
        finite = np.isfinite(tensor.astype(np.float32) if tensor.dtype.name == "bfloat16" else tensor)
        if not finite.all():
            bad = int(finite.size - finite.sum())
            raise CheckpointError(f"{path}: tensor {key!r} holds {bad} NaN or infinite value(s) of {finite.size}; "
                                  "the checkpoint is damaged")


def write_tensor_file(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as one safetensors file (PyTorch's metadata, and `metadata`'s strings). Each array is
    made C-contiguous first: safetensors' numpy writer copies an array's buffer as it lies in memory, so a
    transposed view would be written with its elements in the wrong order, silently."""
    save_file({key: np.ascontiguousarray(value) for key, value in tensors.items()}, str(path),
              metadata={"format": "pt", **(metadata or {})})
