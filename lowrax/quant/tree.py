"""`quantize(params, QuantConfig(...))`: quantized (NF4) base weights for QLoRA, as a pure tree transform."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax

from lowrax.core.kernels import is_kernel_type, is_quantized, kernel_type, quantizer
from lowrax.core.node import is_adapter, is_node
from lowrax.core.tables import TRANSPOSE
from lowrax.quant import int8, nf4, nf4_kernel  # noqa: F401  (int8 and nf4_kernel register their kernel types)


@dataclass(frozen=True)
class QuantConfig:
    """Which weights are quantized, and how."""

    method: str = "nf4"  # "nf4": bitsandbytes' 4-bit NF4; "int8": its row-wise 8-bit (Linear8bitLt)
    blocksize: int = 64  # NF4: elements per absmax block, a power of two from 32 to 4096
    double_quant: bool = True  # NF4: quantize the absmax statistics too (about 4.13 instead of 4.5 bits per weight)
    # Modules whose names contain any of these stay in full precision (embeddings, output heads).
    skip_modules: tuple[str, ...] = ("embed_tokens", "wte", "wpe", "lm_head", "classifier", "score", "embeddings")

    def __post_init__(self):
        quantizer(self.method)  # an unknown method is named with the known ones
        nf4.check_blocksize(self.blocksize)


def quantize(params: Any, cfg: QuantConfig = QuantConfig(), model=None) -> Any:
    """Replace every 2-D linear kernel outside `skip_modules` by a kernel of `cfg.method`'s type (NF4).

    Norms, biases and embeddings stay as they are; LoRA-wrapped kernels get an NF4 base.
    Kernels are quantized in the layout their HF checkpoint stores (torch Linear (out, in),
    or GPT-2's Conv1D (in, out) when `model` says so), so the bytes are bitsandbytes'.
    """
    copied = set() if model is None else {t.path for t in model.tensors() if t.layout != TRANSPOSE}
    kind = quantizer(cfg.method)

    def q(names, kernel):
        spec = kernel_type(kernel)
        if is_quantized(kernel) or getattr(kernel, "ndim", 0) != 2:
            return kernel
        if spec is not None:  # a kernel type over a plain kernel (a pruned one): quantize what it holds
            # (NF4 keeps zero exactly, so a pruned kernel's sparsity survives)
            return dataclasses.replace(kernel, **{c: q(names, getattr(kernel, c)) for c in spec.children})
        return kind.quantize(kernel, cfg, tuple(names) not in copied)

    def visit(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        if not names or names[-1] != "kernel" or any(skip in name for name in names for skip in cfg.skip_modules):
            return leaf
        if is_adapter(leaf):
            return leaf.replace(base=q(names, leaf.base))
        return q(names, leaf)

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: is_node(x) or is_kernel_type(x))
