"""LoRA's initialisations: every `init_lora_weights` value of PEFT 0.21, as `LoraConfig.init`.

Each init gives the starting factors a [in, r], b [r, out] of one kernel w [in, out]
(lowrax's layout; PEFT's weight is w^T) and, for the inits that move part of W into
the adapter, the base that stays frozen under it:

    kaiming       a Kaiming-uniform (PEFT's default, `True`), b = 0
    gaussian      a ~ N(0, 1/r^2), b = 0
    random        a Kaiming-uniform, b ~ N(0, 0.02^2): a non-zero adapter, for tests
    orthogonal    a and b from one random orthogonal r x r matrix's odd and even rows, so
                  a @ b = 0 (r must be even)
    mica          b = the r left singular vectors of W^T with the smallest singular values,
                  frozen; a = 0 (MiCA: only a trains)
    pissa         (a, b) = the top-r singular part of W, base = W - s a b
    pissa_niter_K the same from a randomized SVD with K subspace iterations (faster, approximate)
    olora         W^T = Q R: b = Q[:, :r]^T, a = R[:r]^T, base = W - s a b
    corda, eva, lora_ga   need calibration data (`lora.calibration`)
    loftq         base = NF4 (or int8) quantization of W - s a b, alternated with a rank-r
                  SVD of the quantization error (LoftQ)

The inits that rewrite the base (pissa, olora, corda, lora_ga, loftq) keep the model's output
at init: base + s a b = W (LoftQ: up to the quantization error it minimises).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from lowrax.adapters.init import kaiming_uniform
from lowrax.core.checked import OneOf
from lowrax.errors import LowraxError

RANDOM_INITS = ("kaiming", "gaussian", "random", "orthogonal")
SVD_INITS = ("mica", "pissa", "olora")
CALIBRATED_INITS = ("corda", "eva", "lora_ga")
INITS = (*RANDOM_INITS, *SVD_INITS, "loftq", *CALIBRATED_INITS)
# The base under these holds W minus the adapter's start (loftq: W's quantization).
REWRITES_BASE = ("pissa", "olora", "corda", "lora_ga", "loftq")
_NITER = re.compile(r"pissa_niter_(\d+)$")


@dataclass(frozen=True)
class InitName(OneOf):
    """The config constraint on `LoraConfig.init`: a name of INITS or pissa_niter_K."""

    choices: tuple = INITS

    def holds(self, value) -> bool:
        return isinstance(value, str) and (value in INITS or _NITER.match(value) is not None)

    def describe(self) -> str:
        return f"one of {', '.join(INITS)} or pissa_niter_K (K subspace iterations, e.g. pissa_niter_4)"


def family(init: str) -> str:
    """pissa_niter_K counts as pissa wherever the two behave alike."""
    return "pissa" if _NITER.match(init) else init


def rewrites_base(init: str) -> bool:
    return family(init) in REWRITES_BASE


@dataclass(frozen=True)
class Start:
    """An adapter's starting factors, and the base under it when the init rewrites it."""

    a: jnp.ndarray
    b: jnp.ndarray
    base: jnp.ndarray | None = None


def random_start(init: str, shape: tuple[int, int], r: int, key, adapter_dtype) -> Start:
    """kaiming, gaussian, random or orthogonal factors for a kernel of `shape` [in, out]."""
    d_in, d_out = shape
    ka, kb = jax.random.split(key)
    if init == "orthogonal":
        return _orthogonal(d_in, d_out, r, key, adapter_dtype)
    if init == "gaussian":
        a = jax.random.normal(ka, (d_in, r), jnp.float32) / r
    else:
        a = kaiming_uniform(ka, (d_in, r), d_in)  # PEFT's, on the torch (r, in) weight
    if init == "random":
        b = jax.random.normal(kb, (r, d_out), jnp.float32) * 0.02
    else:
        b = jnp.zeros((r, d_out), jnp.float32)
    return Start(a.astype(adapter_dtype), b.astype(adapter_dtype))


def _orthogonal(d_in: int, d_out: int, r: int, key, adapter_dtype) -> Start:
    # PEFT's construction: q = an orthogonal r x r matrix; a = g1 @ q[0::2] / 10 and
    # b^T = g2 @ q[1::2] / 10 with Gaussian g1 [in, r/2], g2 [out, r/2]. Rows of q are
    # orthonormal, so q[0::2] @ q[1::2]^T = 0 and a @ b = 0: the model is unchanged at init.
    if r % 2:
        raise LowraxError(f"init='orthogonal' needs an even rank, got r={r}")
    kq, ka, kb = jax.random.split(key, 3)
    q, _ = jnp.linalg.qr(jax.random.normal(kq, (r, r), jnp.float32))
    a = jax.random.normal(ka, (d_in, r // 2), jnp.float32) @ q[0::2] / 10.0
    b = (jax.random.normal(kb, (d_out, r // 2), jnp.float32) @ q[1::2]).T / 10.0
    return Start(a.astype(adapter_dtype), b.astype(adapter_dtype))


def svd_start(init: str, w: jnp.ndarray, r: int, scale: float, key, adapter_dtype) -> Start:
    """mica, pissa, pissa_niter_K or olora factors from the float kernel w [in, out]."""
    w32 = w.astype(jnp.float32)
    if init == "olora":
        q, upper = jnp.linalg.qr(w32.T)  # PEFT factors its (out, in) weight; no division by the scale
        return rewritten(w, upper[:r].T, q[:, :r].T, scale, adapter_dtype)
    if init == "mica":
        u, _, _ = jnp.linalg.svd(w32.T, full_matrices=False)  # left singular vectors of the (out, in) weight
        b = u[:, -r:].T
        return Start(jnp.zeros((w.shape[0], r), adapter_dtype), b.astype(adapter_dtype))
    if init == "pissa":
        # On PEFT's (out, in) weight, so the singular vectors' signs are PEFT's too.
        left, s, right_t = jnp.linalg.svd(w32.T, full_matrices=False)
        left, s, right_t = left[:, :r], s[:r], right_t[:r]
    elif match := _NITER.match(init):
        left, s, right_t = randomized_svd(w32.T, r, int(match.group(1)), key)
    else:
        raise LowraxError(f"{init!r} is not an SVD-based LoRA init")
    root = jnp.sqrt(s / scale)
    return rewritten(w, right_t.T * root[None, :], root[:, None] * left.T, scale, adapter_dtype)


def rewritten(w: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray, scale: float, adapter_dtype) -> Start:
    """Start (a, b) with the base W - s a b (in w's dtype), from the adapter as stored (so the
    model's output at init is W's up to the adapter dtype's rounding, as in PEFT)."""
    a, b = a.astype(adapter_dtype), b.astype(adapter_dtype)
    base = w.astype(jnp.float32) - scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    return Start(a, b, base.astype(w.dtype))


def randomized_svd(m: jnp.ndarray, r: int, niter: int, key) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(left [rows, r], s [r], right_t [r, cols]) ~ the top-r SVD of m, as torch.svd_lowrank(m, q=r,
    niter) computes it (Halko et al.): a Gaussian sketch of the range, `niter` re-orthonormalised
    power iterations, then an exact SVD of the r-row projection. Random: the sketch differs
    from torch's, so results agree with PEFT's only as far as the iterations converge."""
    q, _ = jnp.linalg.qr(m @ jax.random.normal(key, (m.shape[1], r), jnp.float32))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(m.T @ q)
        q, _ = jnp.linalg.qr(m @ q)
    left, s, right_t = jnp.linalg.svd(q.T @ m, full_matrices=False)
    return q @ left, s, right_t


def loftq_start(w: jnp.ndarray, r: int, scale: float, bits: int, iterations: int, blocksize: int,
                adapter_dtype) -> tuple[Start, Any]:
    """LoftQ (Li et al. 2023) as PEFT runs it: quantize W - L R, take the rank-r SVD of W minus
    the quantized weight, repeat. Returns the start and the quantized base (an NF4Tensor or
    Int8Tensor holding PEFT's layout, bit-equal to bitsandbytes'). Like PEFT, the factors are
    not divided by the LoRA scale: use alpha = r (scale 1) for base + s a b ~ W."""
    from lowrax.quant import int8, nf4

    w32 = w.astype(jnp.float32)
    residual = w32
    for i in range(iterations):
        if bits == 4:
            quantized = nf4.quantize(residual, blocksize=blocksize, double_quant=False, transpose=True)
            dequantized = nf4.dequantize(quantized, jnp.float32)
        else:
            quantized = int8.quantize_int8(residual, transpose=True)
            dequantized = int8.dequantize_int8(quantized, jnp.float32)
        # PEFT's L = U sqrt(S), R = sqrt(S) Vh of its (out, in) error: a = R^T, b = L^T
        left, s, right_t = jnp.linalg.svd((w32 - dequantized).T, full_matrices=False)
        root = jnp.sqrt(s[:r])
        a, b = right_t[:r].T * root[None, :], root[:, None] * left[:, :r].T
        if i + 1 < iterations:
            residual = w32 - a @ b
    del scale  # PEFT's LoftQ ignores it (see the docstring)
    return Start(a.astype(adapter_dtype), b.astype(adapter_dtype)), quantized.replace(dtype=jnp.dtype(w.dtype).name)
