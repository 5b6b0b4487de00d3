"""`quantize(params, QuantConfig(...))`: NF4 base weights for QLoRA, as a pure tree transform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from lowrax.errors import LowraxError
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
    from lowrax.io.tables import TRANSPOSE
    from lowrax.nodes import LoraKernel

    copied = set() if model is None else {t.path for t in model.tensors() if t.layout != TRANSPOSE}

    def q(names, kernel):
        return nf4.quantize(kernel, cfg.blocksize, cfg.double_quant, transpose=tuple(names) not in copied)

    def visit(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        if any(skip in name for name in names for skip in cfg.skip_modules):
            return leaf
        if isinstance(leaf, LoraKernel) and not isinstance(leaf.base, nf4.NF4Tensor):
            return leaf.replace(base=q(names, leaf.base))
        if names and names[-1] == "kernel" and getattr(leaf, "ndim", 0) == 2 and not isinstance(leaf, nf4.NF4Tensor):
            return q(names, leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: isinstance(x, (LoraKernel, nf4.NF4Tensor)))
