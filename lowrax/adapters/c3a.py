"""C3A (Chen et al. 2025, "Parameter-Efficient Fine-Tuning via Circular Convolution"; PEFT `C3AConfig`):
the weight delta is block-circulant. The kernel [in, out] is cut into b x b blocks, and block (i, j) is
the circulant matrix of b learned numbers, so a layer trains in * out / b of them.

    y = x @ base + C(x) / in          C: per output block m, the sum over input blocks n of the
                                      circular cross-correlation of x_n with kernel[m, n]

computed as PEFT computes it, through FFTs: C(x)_m = Re FFT(sum_n IFFT(x_n) * FFT(kernel[m, n])),
which costs in * out / b multiply-adds per token instead of in * out. As a matrix, entry (n*b + j,
m*b + k) of delta is kernel[m, n, (j - k) mod b] / in: merging adds it to the kernel.

PEFT's default init draws the kernel Xavier-uniform (`init_weights="xavier_uniform"`, also `False`), so
the model changes at init as in PEFT; `init_weights=True` starts from zeros (the base model).
PEFT implements C3A for nn.Linear only: on GPT-2 (Conv1D layers) it trains and merges here, and saving
it in PEFT's format is refused.

PEFT format (`peft_type: C3A`): `<module>.c3a_kernel` shaped (out / b, in / b, b); `block_size` and
`block_size_pattern` in the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.adapters.delta import DeltaKernel
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, check_patterns, pattern_value, targeting_from_peft
from lowrax.core.checked import PositiveInt
from lowrax.core.node import FACTOR
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, refuse_conv1d, value_and_pattern

SUFFIX = ".c3a_kernel"


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class C3AConfig(TargetConfig):
    """C3A's hyper-parameters, with PEFT's names and defaults."""

    block_size: PositiveInt = 256  # b: must divide every targeted layer's input and output widths
    block_size_pattern: dict = field(default_factory=dict)  # regex on module name -> its block size
    # "xavier_uniform" (PEFT's default; False too), "kaiming_uniform", "gaussian", or True: zeros
    init_weights: bool | Literal["xavier_uniform", "kaiming_uniform", "gaussian"] = "xavier_uniform"

    def __post_init__(self):
        super().__post_init__()
        check_patterns(self, "block_size_pattern", self.block_size_pattern, PositiveInt)


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class C3AKernel(DeltaKernel):
    """base [in, out] frozen; kernel [out / b, in / b, b] trained."""

    base: Any
    kernel: jnp.ndarray
    peft_type = "C3A"

    def field_labels(self) -> dict:
        return {"kernel": FACTOR}

    def field_axes(self) -> dict:
        return {"kernel": (None, None, None)}  # block counts and the block width: replicated

    def delta(self) -> jnp.ndarray:
        m, n, b = self.kernel.shape
        shift = (jnp.arange(b)[:, None] - jnp.arange(b)[None, :]) % b  # [j (in), k (out)]
        blocks = self.kernel.astype(jnp.float32)[:, :, shift]  # [m, n, j, k]
        return blocks.transpose(1, 2, 0, 3).reshape(n * b, m * b) / (n * b)

    def delta_output(self, x: jnp.ndarray) -> jnp.ndarray:
        m, n, b = self.kernel.shape
        blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], n, b)
        mixed = jnp.einsum("...nb,mnb->...mb", jnp.fft.ifft(blocks), jnp.fft.fft(self.kernel.astype(jnp.float32)))
        return jnp.fft.fft(mixed).real.reshape(*x.shape[:-1], m * b) / (n * b)


# --- build ----------------------------------------------------------------------------------------

def block_size_for(name: str, base, cfg_block: int, patterns: dict | None, widths_gcd: int) -> int:
    """The layer's block size; an error names the layer and a size that fits every targeted layer."""
    b = int(pattern_value(name, patterns, cfg_block))
    d_in, d_out = base.shape
    if d_in % b or d_out % b:
        raise LowraxError(f"C3A block_size {b} must divide {name}'s input width {d_in} and output width {d_out}; "
                          f"choose a divisor of {widths_gcd} (the greatest common divisor of the targeted layers' "
                          "widths) or set block_size_pattern for this layer")
    return b


def initial_kernel(key, shape: tuple[int, int, int], d_in: int, d_out: int, init, dtype) -> jnp.ndarray:
    """PEFT's `reset_c3a_parameters` draws (the same distributions, not torch's numbers)."""
    if init is True:
        return jnp.zeros(shape, dtype)
    if init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)
    if init in ("xavier_uniform", False):
        bound = math.sqrt(3.0) * math.sqrt(2.0 / (d_in + d_out))
    elif init == "kaiming_uniform":
        bound = math.sqrt(1.0 / d_in)
    else:
        raise LowraxError(f"C3AConfig.init_weights must be True, False, 'xavier_uniform', 'kaiming_uniform' or "
                          f"'gaussian', got {init!r}")
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def build_nodes(bases: dict[str, Any], cfg: C3AConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes, widths_gcd = {}, math.gcd(*(d for base in bases.values() for d in base.shape))
    for i, (name, base) in enumerate(bases.items()):
        b = block_size_for(name, base, cfg.block_size, cfg.block_size_pattern, widths_gcd)
        d_in, d_out = base.shape
        kernel = initial_kernel(jax.random.fold_in(key, i), (d_out // b, d_in // b, b), d_in, d_out,
                                cfg.init_weights, adapter_dtype)
        nodes[name] = C3AKernel(base=base, kernel=kernel)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, C3AKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "C3A")
    sizes = {name: int(node.kernel.shape[2]) for name, node in nodes.items()}
    common, pattern = value_and_pattern(sizes)
    tensors = {f"{PREFIX}{name}{SUFFIX}": jax.device_get(node.kernel.astype(jnp.float32)) for name, node in nodes.items()}
    return tensors, {"block_size": common, "block_size_pattern": pattern,
                     "init_weights": "xavier_uniform", "bias": "none"}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    nodes = {}
    for name in adapted_modules(tensors, SUFFIX, bases, "C3A"):
        d_in, d_out = bases[name].shape
        b = int(pattern_value(name, config.get("block_size_pattern"), config.get("block_size", 256)))
        if d_in % b or d_out % b:
            raise CheckpointError(f"C3A block_size {b} does not divide {name}'s widths {d_in} x {d_out}")
        kernel = adapter_tensor(tensors, name, SUFFIX[1:], (d_out // b, d_in // b, b), "C3A")
        nodes[name] = C3AKernel(base=bases[name], kernel=jnp.asarray(kernel, adapter_dtype))
    return nodes, {}, {f"{n}{SUFFIX}" for n in nodes}


def to_config(config: dict) -> tuple[str, C3AConfig]:
    return "c3a", C3AConfig(block_size=int(config.get("block_size", 256)),
                            block_size_pattern=dict(config.get("block_size_pattern") or {}),
                            **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="c3a", config=C3AConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"c3a": lambda: C3AConfig(block_size=8)}, identity_at_init=False))
register_peft_format(PeftFormat(peft_type="C3A", write=write, read=read, to_config=to_config))
