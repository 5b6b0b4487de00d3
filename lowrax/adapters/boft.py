"""BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization";
PEFT `BOFTConfig`): OFT's block-diagonal rotation of the input composed with butterfly permutations,
so a few factors of small blocks reach a dense orthogonal matrix; the output is also scaled.

    y = ((x B) @ base) * s + bias       B = M_{m-1} ... M_1 M_0,  M_i = P_i diag(Q_i1 .. Q_iD) P_i^T
    Q = (I - S)(I + S)^-1,  S = (R - R^T) / 2        (the exact Cayley transform of each block)

R [m, D, b, b] (m = `boft_n_butterfly_factor`, D blocks of width b per factor) and s [out] train; the
permutations P_i are PEFT's `block_butterfly_perm` (the identity for m = 1). PEFT's init
(`init_weights=True`): R zero and s one (the base model); False draws R ~ N(0, 0.1), s ~ N(1, 0.1).
`boft_dropout` replaces that share of one random factor's blocks by the identity in training.
Merging folds B and s into the kernel; unmerging applies B^T and divides s out.

PEFT format (`peft_type: BOFT`): `<module>.boft_R` (m, D, b, b) and `<module>.boft_s` (out, 1);
`boft_block_size` or `boft_block_num` (the other 0) and `boft_n_butterfly_factor` in the config.
PEFT without its CUDA extension builds one factor whatever `boft_n_butterfly_factor` says, so a file with
more factors loads in PEFT where that extension is built. PEFT implements BOFT for nn.Linear (and
convolutions) only: on GPT-2 (Conv1D layers) it trains and merges here, and saving it for PEFT is refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.cayley import cayley as exact_cayley
from lowrax.core.checked import ConfigValueError, Count, PositiveInt, Probability, owner_name
from lowrax.core.linear import matmul
from lowrax.core.node import ROTATION, VECTOR, AdapterNode
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, one_setting, refuse_conv1d


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BOFTConfig(TargetConfig):
    """BOFT's hyper-parameters, with PEFT's names and defaults. Give exactly one of `boft_block_size` and
    `boft_block_num` (the other 0)."""

    boft_block_size: Count = 4  # the width of each block
    boft_block_num: Count = 0  # blocks per factor
    boft_n_butterfly_factor: PositiveInt = 1  # butterfly factors (1: plain block-diagonal OFT)
    boft_dropout: Probability = 0.0  # training: share of one factor's blocks replaced by the identity
    init_weights: bool = True  # True: R zero, s one (the base model); False: random

    def __post_init__(self):
        super().__post_init__()
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ConfigValueError(owner_name(self), "boft_block_size", 0,
                                   "a block width when boft_block_num is 0 (set exactly one of the two)")
        if self.boft_block_size and self.boft_block_num:
            raise ConfigValueError(owner_name(self), "boft_block_num", self.boft_block_num,
                                   f"0 when boft_block_size is set ({self.boft_block_size}): set exactly one of the two")


def layer_blocks(name: str, d_in: int, block_size: int, block_num: int, factors: int,
                 error=LowraxError) -> tuple[int, int]:
    """(blocks per factor, block width) for a layer of input width d_in, with PEFT's checks."""
    extra = factors - 1  # PEFT's internal count of butterfly factors beyond the first
    if block_size == 0:
        if d_in % block_num:
            raise error(f"BOFT boft_block_num {block_num} must divide {name}'s input width {d_in}")
        if extra and (extra > int(np.log2(block_num)) or block_num % 2**extra):
            raise error(f"BOFT boft_block_num {block_num} must be a multiple of 2^{extra} for "
                        f"boft_n_butterfly_factor {factors}")
        block_size = d_in // block_num
    else:
        if d_in % block_size:
            raise error(f"BOFT boft_block_size {block_size} must divide {name}'s input width {d_in}")
        if extra and d_in % (block_size * 2**extra):
            raise error(f"BOFT boft_block_size {block_size} x 2^{extra} must divide {name}'s input width {d_in} for "
                        f"boft_n_butterfly_factor {factors}")
        block_num = d_in // block_size
    if extra and (block_num % 2 or block_size % 2):
        raise error(f"BOFT with butterfly factors needs an even block count and width for {name}, got {block_num} "
                    f"blocks of {block_size}")
    return block_num, block_size


@functools.lru_cache(maxsize=64)
def butterfly_permutation(n: int, blocks: int, half_width: int, extra: int) -> tuple[int, ...]:
    """PEFT's `block_butterfly_perm(n, blocks, half_width, extra)`: within each of `blocks` groups, runs of
    `half_width` positions reordered evens first, then odds."""
    if extra == 0:
        return tuple(range(n))
    size = n // blocks
    runs = size // half_width
    order = [pos for pos in list(range(0, runs, 2)) + list(range(1, runs, 2))]
    within = [pos * half_width + j for pos in order for j in range(half_width)]
    return tuple(start + within[j] for start in range(0, n, size) for j in range(size))


# --- node -----------------------------------------------------------------------------------------

def cayley(r: jnp.ndarray) -> jnp.ndarray:
    """(I - S)(I + S)^-1 for S the skew part of each [b, b] block of r [..., b, b]."""
    return exact_cayley(0.5 * (r - jnp.swapaxes(r, -1, -2)))


@struct.dataclass
class BOFTKernel(AdapterNode):
    """base [in, out] frozen; rotations [m, D, b, b] and scale [out] trained."""

    base: Any
    rotations: jnp.ndarray
    scale: jnp.ndarray
    dropout_key: Any = None
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "BOFT"

    def field_labels(self) -> dict:
        return {"rotations": ROTATION, "scale": VECTOR}

    def field_axes(self) -> dict:
        return {"rotations": (None, None, None, None), "scale": ("out",)}

    def blocks(self) -> jnp.ndarray:
        """The orthogonal blocks [m, D, b, b], float32, with training's block dropout applied."""
        q = cayley(self.rotations.astype(jnp.float32))
        if self.dropout <= 0 or self.dropout_key is None:
            return q
        m, d, b, _ = q.shape
        k_factor, k_blocks = jax.random.split(self.dropout_key)
        replaced = jax.random.permutation(k_blocks, jnp.arange(d) < int(self.dropout * d))
        mask = (jnp.arange(m)[:, None] == jax.random.randint(k_factor, (), 0, m)) & replaced[None, :]
        return jnp.where(mask[:, :, None, None], jnp.eye(b, dtype=q.dtype), q)

    def rotate(self, x: jnp.ndarray) -> jnp.ndarray:
        """x B for rows x [..., in], factor by factor and never forming B: with M = P diag(Q) P^T, entry (i, j)
        of M is diag(Q)[perm[i], perm[j]], so x M is x reordered by perm's inverse, rotated block by block,
        then reordered by perm (tokens x in x b multiply-adds per factor instead of tokens x in^2)."""
        q = self.blocks().astype(x.dtype)
        m, d, b, _ = q.shape
        n = d * b
        for i in reversed(range(m)):  # B = M_{m-1} ... M_0, so x B meets M_{m-1} first
            perm = np.asarray(butterfly_permutation(n, d // 2**i, b // 2, m - 1))
            blocks = x[..., np.argsort(perm)].reshape(*x.shape[:-1], d, b)
            x = jnp.einsum("...di,dij->...dj", blocks, q[i]).reshape(*x.shape[:-1], n)[..., perm]
        return x

    def butterfly(self) -> jnp.ndarray:
        """B [in, in], float32 (for merging)."""
        return self.rotate(jnp.eye(self.rotations.shape[1] * self.rotations.shape[2], dtype=jnp.float32))

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(self.rotate(x), self.base)
        return y * self.scale.astype(y.dtype)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return (self.butterfly() @ w) * self.scale.astype(jnp.float32)[None, :]

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return self.butterfly().T @ (merged / self.scale.astype(jnp.float32)[None, :])


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: BOFTConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    m, nodes = cfg.boft_n_butterfly_factor, {}
    for i, (name, base) in enumerate(bases.items()):
        d_in, d_out = base.shape
        d, b = layer_blocks(name, d_in, cfg.boft_block_size, cfg.boft_block_num, m)
        if cfg.init_weights:
            rotations, scale = jnp.zeros((m, d, b, b), adapter_dtype), jnp.ones((d_out,), adapter_dtype)
        else:
            k_r, k_s = jax.random.split(jax.random.fold_in(key, i))
            rotations = (0.1 * jax.random.normal(k_r, (m, d, b, b), jnp.float32)).astype(adapter_dtype)
            scale = (1.0 + 0.1 * jax.random.normal(k_s, (d_out,), jnp.float32)).astype(adapter_dtype)
        nodes[name] = BOFTKernel(base=base, rotations=rotations, scale=scale, dropout=cfg.boft_dropout)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, BOFTKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "BOFT")
    m, b = one_setting(((int(n.rotations.shape[0]), int(n.rotations.shape[2])) for n in nodes.values()), "BOFT",
                       "factor count and block width")
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.boft_R"] = np.asarray(node.rotations, np.float32)
        tensors[f"{PREFIX}{name}.boft_s"] = np.asarray(node.scale, np.float32)[:, None]
    return tensors, {"boft_block_size": b, "boft_block_num": 0, "boft_n_butterfly_factor": m,
                     "boft_dropout": max(n.dropout for n in nodes.values()), "init_weights": True, "bias": "none"}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    m = int(config.get("boft_n_butterfly_factor", 1))
    size, num = int(config.get("boft_block_size") or 0), int(config.get("boft_block_num") or 0)
    if (size == 0) == (num == 0):
        raise CheckpointError(f"BOFT adapter_config.json must set exactly one of boft_block_size ({size}) and "
                              f"boft_block_num ({num})")
    nodes, used = {}, set()
    for name in adapted_modules(tensors, ".boft_R", bases, "BOFT"):
        d_in, d_out = bases[name].shape
        d, b = layer_blocks(name, d_in, size, num, m, error=CheckpointError)
        rotations = adapter_tensor(tensors, name, "boft_R", (m, d, b, b), "BOFT")
        scale = adapter_tensor(tensors, name, "boft_s", (d_out, 1), "BOFT")[:, 0]
        nodes[name] = BOFTKernel(base=bases[name], rotations=jnp.asarray(rotations, adapter_dtype),
                                 scale=jnp.asarray(scale, adapter_dtype), dropout=float(config.get("boft_dropout") or 0.0))
        used |= {f"{name}.boft_R", f"{name}.boft_s"}
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, BOFTConfig]:
    return "boft", BOFTConfig(boft_block_size=int(config.get("boft_block_size") or 0),
                              boft_block_num=int(config.get("boft_block_num") or 0),
                              boft_n_butterfly_factor=int(config.get("boft_n_butterfly_factor", 1)),
                              boft_dropout=float(config.get("boft_dropout") or 0.0), **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="boft", config=BOFTConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"boft": lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2)}))
register_peft_format(PeftFormat(peft_type="BOFT", write=write, read=read, to_config=to_config))
