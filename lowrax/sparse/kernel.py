"""A sparse base kernel: a pruned weight and its mask, as one leaf type of the parameter tree.

`SparseKernel(kernel, mask)` stands where a linear kernel was. The kernel [in, out] (a plain
array, or an NF4 tensor for QLoRA over a pruned base) is zero wherever `mask` is False, so
the layer's product is the kernel's own: `linear` dispatches to it like any kernel type, and
an adapter wraps it as its frozen base. The mask is what merging consults to keep the
sparsity (`lowrax.merge(params, keep_sparsity=True)`: the merged delta is masked), and what
`lowrax.prune` reports per layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.core.kernels import KernelType, dense_kernel, kernel_shardings, register_kernel_type
from lowrax.core.linear import matmul
from lowrax.core.tables import get_path, set_path
from lowrax.errors import CheckpointError


@struct.dataclass
class SparseKernel:
    """A pruned kernel: `kernel` [in, out] is zero where `mask` (bool [in, out], True = kept) is False.
    `pattern`: how the mask was chosen ("unstructured", "2:4", ...), carried for reports and saving."""

    kernel: Any
    mask: jnp.ndarray
    pattern: str = struct.field(pytree_node=False, default="unstructured")

    @property
    def shape(self) -> tuple:
        return tuple(self.kernel.shape)

    @property
    def ndim(self) -> int:
        return len(self.kernel.shape)

    @property
    def dtype(self):
        return self.kernel.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def sparsity(self) -> float:
        """The fraction of weights pruned."""
        return 1.0 - float(jnp.mean(self.mask.astype(jnp.float32)))


def sparse_kernel(kernel: jnp.ndarray, kept: jnp.ndarray, pattern: str = "unstructured") -> SparseKernel:
    """The SparseKernel keeping `kernel` where `kept` is True (the rest set to zero)."""
    kept = jnp.asarray(kept, bool)
    return SparseKernel(kernel=jnp.where(kept, kernel, jnp.zeros((), kernel.dtype)), mask=kept, pattern=pattern)


def is_sparse(x: Any) -> bool:
    return isinstance(x, SparseKernel)


def masked_like(base: Any, merged: jnp.ndarray) -> jnp.ndarray:
    """`merged` with the pruned weights of a sparse `base` set to zero (merged as is otherwise)."""
    return jnp.where(base.mask, merged, jnp.zeros((), merged.dtype)) if is_sparse(base) else merged


def sparse_modules(params: Any) -> dict[str, SparseKernel]:
    """Dotted module name -> SparseKernel of every pruned kernel in the tree (bare or an adapter's base)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: is_sparse(x) or hasattr(x, "base"))[0]:
        leaf = getattr(leaf, "base", leaf)
        if is_sparse(leaf):
            keys = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
            out[".".join(keys[:-1])] = leaf
    return out


def with_sparse_kernels(params: dict, modules: dict[str, SparseKernel]) -> dict:
    """params (plain kernels, e.g. merged ones) with the kernels of `modules` made SparseKernels
    again under those modules' masks and patterns (the kernels must already be zero off the mask)."""
    out = jax.tree.map(lambda x: x, params)  # fresh containers; arrays shared
    for name, sparse in modules.items():
        path = tuple(name.split(".")) + ("kernel",)
        set_path(out, path, SparseKernel(kernel=get_path(out, path), mask=sparse.mask, pattern=sparse.pattern))
    return out


PRUNING_RECORD = "pruning.json"


def _record(params: Any, extra: dict | None) -> dict | None:
    """The pruning.json of a tree with SparseKernels: each pruned module's pattern and sparsity."""
    modules = sparse_modules(params)
    if not modules:
        return None
    return {"modules": {name: {"pattern": k.pattern, "sparsity": round(k.sparsity(), 6)}
                        for name, k in sorted(modules.items())}, **(extra or {})}


def _restore(record: dict) -> dict:
    """{module: wrap} for the modules a pruning.json names: the kept weights are the loaded
    tensor's non-zeros (read before any quantization), the mask laid out as the kernel."""
    try:
        patterns = {name: str(entry.get("pattern", "unstructured")) for name, entry in record["modules"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{PRUNING_RECORD} is not a pruning record (expected {{\"modules\": {{name: "
                              f"{{\"pattern\", \"sparsity\"}}}}}}): {e}") from e

    def wrap_for(pattern):
        def wrap(value_hf, to_tree):
            kept = np.asarray(dense_kernel(to_tree(value_hf))) != 0  # NF4 codes of zero decode to exactly zero
            return lambda kernel, place: SparseKernel(kernel=kernel, mask=place(kept), pattern=pattern)
        return wrap

    return {name: wrap_for(pattern) for name, pattern in patterns.items()}


def _axes(kernel: SparseKernel, sharding_of) -> SparseKernel:
    # The mask is laid out as the kernel; a None field is the other half of `split`.
    return kernel.replace(kernel=kernel_shardings(kernel.kernel, sharding_of),
                          mask=None if kernel.mask is None else sharding_of(kernel.mask, None))


SPARSE_KERNEL = register_kernel_type(SparseKernel, KernelType(
    name="sparse", matmul=lambda x, k: matmul(x, k.kernel), dense=lambda k, tie_to=None, dtype=None: dense_kernel(k.kernel, tie_to, dtype),
    keep_merged=lambda k, merged: jnp.where(k.mask, merged, jnp.zeros((), merged.dtype)), fixed="it is pruned (a SparseKernel), and new values would fill its pruned weights",
    axes=_axes, record_file=PRUNING_RECORD, record=_record, restore=_restore, children=("kernel",)))
