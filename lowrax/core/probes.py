"""Probe kernels: a kernel that notes the input it is multiplied with while a forward is traced.

Calibration passes (pruning's statistics, the data-driven LoRA inits) replace the kernels
they watch by `Probe(kernel, name)`, run the model inside `recording()`, and get every
probed projection's input [tokens, in] as a traced array, to reduce inside the same program.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

from flax import struct

from lowrax.core.kernels import register_linear
from lowrax.core.linear import matmul

_RECORDED: contextvars.ContextVar = contextvars.ContextVar("lowrax_recorded_inputs", default=None)


@struct.dataclass
class Probe:
    """A kernel that notes its (flattened) input while the model is traced, then multiplies."""

    kernel: Any
    name: str = struct.field(pytree_node=False, default="")


@register_linear(Probe)
def _probe_matmul(x, probe: Probe):
    recorded = _RECORDED.get()
    if recorded is not None:
        recorded.append((probe.name, x))
    return matmul(x, probe.kernel)  # any kernel type: a plain array, NF4, ...


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """The list that every probe traced inside the block appends (name, input) to."""
    recorded: list = []
    token = _RECORDED.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDED.reset(token)
