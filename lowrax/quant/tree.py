"""`quantize(params, QuantConfig(...))`: NF4 base weights for QLoRA, as a pure tree transform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

import jax.numpy as jnp

from lowrax.adapters.node import is_adapter, is_node, resolve
from lowrax.adapters.tree import without_shared
from lowrax.errors import LowraxError
from lowrax.io.tables import TRANSPOSE
from lowrax.pruning.sparse import is_sparse
from lowrax.quant import nf4

METHODS = ("nf4",)


@dataclass(frozen=True)
class QuantConfig:
    """Which weights become NF4 and how."""

    method: str = "nf4"  # the 4-bit format (bitsandbytes' NF4)
    blocksize: int = 64  # elements per absmax block: a power of two from 32 to 4096
    double_quant: bool = True  # quantize the absmax statistics too (about 4.13 instead of 4.5 bits per weight)
    # Modules whose names contain any of these stay in full precision (embeddings, output heads).
    skip_modules: tuple[str, ...] = ("embed_tokens", "wte", "wpe", "lm_head", "classifier", "score", "embeddings")

    def __post_init__(self):
        if self.method not in METHODS:
            raise LowraxError(f"quantization method must be one of {METHODS}, got {self.method!r}")
        nf4.check_blocksize(self.blocksize)


def quantize(params: Any, cfg: QuantConfig = QuantConfig(), model=None) -> Any:
    """Replace every 2-D linear kernel outside `skip_modules` by an `NF4Tensor`.

    Norms, biases and embeddings stay as they are; LoRA-wrapped kernels get an NF4 base.
    Kernels are quantized in the layout their HF checkpoint stores (torch Linear (out, in),
    or GPT-2's Conv1D (in, out) when `model` says so), so the bytes are bitsandbytes'.
    """
    copied = set() if model is None else {t.path for t in model.tensors() if t.layout != TRANSPOSE}

    def q(names, kernel):
        return nf4.quantize(kernel, cfg.blocksize, cfg.double_quant, transpose=tuple(names) not in copied)

    def visit(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        if any(skip in name for name in names for skip in cfg.skip_modules):
            return leaf
        if is_sparse(leaf) and not isinstance(leaf.kernel, nf4.NF4Tensor):
            return leaf.replace(kernel=q(names, leaf.kernel))  # NF4 keeps zero exactly: the sparsity survives
        if is_adapter(leaf) and names[-1] == "kernel" and is_sparse(leaf.base):
            return leaf.replace(base=visit(path, leaf.base))
        if is_adapter(leaf) and names[-1] == "kernel" and not isinstance(leaf.base, nf4.NF4Tensor):
            return leaf.replace(base=q(names, leaf.base))
        if names and names[-1] == "kernel" and getattr(leaf, "ndim", 0) == 2 and not isinstance(leaf, nf4.NF4Tensor):
            return q(names, leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(
        visit, params, is_leaf=lambda x: is_node(x) or isinstance(x, nf4.NF4Tensor) or is_sparse(x))


def merge_requantized(params: Any) -> tuple[Any, dict]:
    """Merge LoRA adapters into their NF4 bases and quantize the result again.

    Returns (params with NF4 kernels holding base + scale * A @ B, report). Re-quantizing
    adds rounding error, as PEFT warns; the report measures it per module against the
    exact float32 merge: `mean_abs`, `max_abs` and `relative` (||error|| / ||merged||),
    plus the worst `relative` over all modules under "worst".
    """
    report: dict = {}

    def adapted_nf4(x) -> bool:
        return isinstance(x, dict) and is_adapter(x.get("kernel")) and isinstance(x["kernel"].base, nf4.NF4Tensor)

    def visit(path, layer):
        if not adapted_nf4(layer):
            return layer
        node = layer["kernel"]
        base = node.base
        exact = node.merge_into(nf4.dequantize(base, jnp.float32))
        again = nf4.quantize(exact.astype(base.dtype), base.blocksize, base.double_quantized, transpose=base.transposed)
        error = nf4.dequantize(again, jnp.float32) - exact
        name = ".".join(str(getattr(p, "key", "")) for p in path)
        report[name] = {"mean_abs": float(jnp.mean(jnp.abs(error))), "max_abs": float(jnp.max(jnp.abs(error))),
                        "relative": float(jnp.linalg.norm(error) / jnp.maximum(jnp.linalg.norm(exact), 1e-30))}
        out = dict(layer, kernel=again)
        if layer.get("bias") is not None:  # methods that scale the output scale the bias too (IA3)
            out["bias"] = node.merge_bias(layer["bias"].astype(jnp.float32)).astype(layer["bias"].dtype)
        return out

    merged = without_shared(jax.tree_util.tree_map_with_path(
        visit, resolve(params), is_leaf=lambda x: adapted_nf4(x) or is_node(x) or isinstance(x, nf4.NF4Tensor)))
    if report:
        report["worst"] = {"relative": max(r["relative"] for r in report.values())}
    return merged, report
