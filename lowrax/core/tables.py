"""Declarative tables mapping HF checkpoint keys to lowrax parameter-tree paths.

Each family writes one table of `TensorSpec`s: the tree path, the HF key, the
tree-side shape as a function of the config, and how the tensor is laid out
(`copy`, or `transpose` for torch `nn.Linear` weights stored (out, in) where
Flax kernels are (in, out)). `{i}` in a path or key stands for the layer
index. The same table drives loading, saving and the shape checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from lowrax.core.kernels import kernel_from_hf

COPY = "copy"
TRANSPOSE = "transpose"


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: where it lives in the tree and in the HF file."""

    path: str
    hf_key: str
    shape: Callable[[Any], tuple[int, ...]]
    layout: str = COPY
    when: Callable[[Any], bool] | None = None
    optional: bool = False
    # How many times `{i}` repeats (default: the model's layer count); an encoder-decoder's
    # decoder stack may have its own.
    layers: Callable[[Any], int] | None = None


@dataclass(frozen=True)
class Tensor:
    """A `TensorSpec` made concrete for one config and layer index."""

    path: tuple[str, ...]
    hf_key: str
    shape: tuple[int, ...]
    layout: str
    optional: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape the tensor has in the HF checkpoint."""
        return tuple(reversed(self.shape)) if self.layout == TRANSPOSE else self.shape

    def from_hf(self, array):
        """HF layout -> tree layout (shape already checked); a kernel type turns itself
        (NF4 codes keep their bytes and are marked transposed)."""
        return kernel_from_hf(array, self.shape, self.layout == TRANSPOSE)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """Tree layout -> HF layout."""
        return np.ascontiguousarray(array.T) if self.layout == TRANSPOSE else np.ascontiguousarray(array)


def expand(table: tuple[TensorSpec, ...], config: Any, num_layers: int) -> list[Tensor]:
    """Every tensor the config implies, `{i}` entries repeated for each layer."""
    out = []
    for spec in table:
        if spec.when is not None and not spec.when(config):
            continue
        shape = tuple(int(n) for n in spec.shape(config))
        count = num_layers if spec.layers is None else spec.layers(config)
        indices = range(count) if "{i}" in spec.path else [None]
        for i in indices:
            path = spec.path if i is None else spec.path.replace("{i}", str(i))
            key = spec.hf_key if i is None else spec.hf_key.replace("{i}", str(i))
            out.append(Tensor(tuple(path.split("/")), key, shape, spec.layout, spec.optional))
    return out


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating dicts on the way."""
    node = tree
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    """tree[path[0]][path[1]]..., or a KeyError naming the full path."""
    node = tree
    for depth, name in enumerate(path):
        if not isinstance(node, dict) or name not in node:
            raise KeyError("/".join(path[: depth + 1]))
        node = node[name]
    return node
