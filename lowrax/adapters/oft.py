"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning";
PEFT 0.21's `OFTConfig`): the layer's input is rotated by a learned block-diagonal
orthogonal matrix before the frozen kernel.

    y = (x R) W        R = diag(R_1, ..., R_r), each R_i [b, b] with r * b = in

Each block is the Cayley transform of a skew-symmetric Q_i (its b(b-1)/2 upper-triangle
entries are the parameters): exactly R = (I - Q)(I + Q)^-1, or by default PEFT's
truncated Neumann series R = I + 2Q + 2Q^2 + ... (no inverse; near-orthogonal for small Q).
Parameters start at zero, so R = I and the model is unchanged at init. `block_share`
uses one block for all r; `coft` (constrained OFT) keeps each Q within a Frobenius ball
of radius eps / sqrt(#blocks), projecting as PEFT does: the forward uses the projected
Q (gradients taken there) and, as PEFT writes the projection back into the parameter,
the step projects the stored Q after every update.

Merging folds R into the kernel (W <- R W); unmerging solves with R per block.

PEFT format (`peft_type: OFT`): `<module>.oft_R.weight` shaped (r, b(b-1)/2), or
(1, ...) with block_share; the config carries `r` or `oft_block_size` (the other 0) and
each layer derives its own block count, adjusted to a divisor of its input width as
PEFT adjusts it (with the same warning).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.core.cayley import cayley as exact_cayley
from lowrax.core.checked import Count, PositiveFloat, Probability
from lowrax.core.node import ROTATION, AdapterNode
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.errors import CheckpointError, LowraxError
from lowrax.core.linear import matmul
from lowrax.peft.common import PREFIX, check_shape, refuse_conv1d

SUFFIX = ".oft_R.weight"
NEUMANN_SINCE = "0.18.0"  # PEFT changed its Cayley-Neumann series in this release; lowrax computes the new one


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OFTConfig(TargetConfig):
    """OFT's hyper-parameters, with PEFT 0.21's names and defaults. Give exactly one of `r`
    (blocks per layer) and `oft_block_size` (the other 0): r * block size = the layer's input width."""

    r: Count = 0  # blocks per layer
    oft_block_size: Count = 32  # the width of each block
    module_dropout: Probability = 0.0  # training: share of blocks replaced by the identity each step
    coft: bool = False  # constrained OFT: keep each Q within eps of zero
    eps: PositiveFloat = 6e-5  # COFT's radius (divided by sqrt(#blocks))
    block_share: bool = False  # one block shared by all r positions
    use_cayley_neumann: bool = True  # Neumann series instead of the exact inverse
    num_cayley_neumann_terms: Count = 5
    init_weights: bool = True  # True: Q = 0 (the base model); False: Q ~ N(0, 0.1^2), as PEFT

    def __post_init__(self):
        super().__post_init__()
        if (self.r == 0) == (self.oft_block_size == 0):
            raise LowraxError(f"OFTConfig needs exactly one of r and oft_block_size non-zero (r x oft_block_size = "
                              f"the layer's input width), got r={self.r}, oft_block_size={self.oft_block_size}")


def nearest_divisor(width: int, wanted: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of width nearest to wanted (ties go down)."""
    if wanted >= width:
        return width
    higher = wanted
    while higher <= width and width % higher:
        higher += 1
    lower = wanted
    while lower > 1 and width % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def blocks_for(width: int, r: int, block_size: int, name: str) -> tuple[int, int]:
    """(blocks, block size) for a layer of this input width, adjusted as PEFT adjusts them."""
    if r == 0:
        adjusted = nearest_divisor(width, block_size)
        if adjusted != block_size:
            warnings.warn(f"OFT: oft_block_size {block_size} does not divide {name}'s input width {width}; "
                          f"using {adjusted}, as PEFT does", stacklevel=3)
        return width // adjusted, adjusted
    adjusted = nearest_divisor(width, r)
    if adjusted != r:
        warnings.warn(f"OFT: r {r} does not divide {name}'s input width {width}; using {adjusted}, as PEFT does",
                      stacklevel=3)
    return adjusted, width // adjusted


# --- node -----------------------------------------------------------------------------------------

def skew(q: jnp.ndarray, b: int) -> jnp.ndarray:
    """[n, b(b-1)/2] upper-triangle entries (torch.triu_indices order) -> [n, b, b] skew-symmetric."""
    rows, cols = np.triu_indices(b, 1)
    m = jnp.zeros((q.shape[0], b, b), q.dtype).at[:, rows, cols].set(q)
    return m - jnp.swapaxes(m, -1, -2)


def cayley(q: jnp.ndarray, b: int, neumann: bool, terms: int) -> jnp.ndarray:
    """Rotation blocks [n, b, b] from parameters [n, b(b-1)/2], PEFT's `_cayley_batch`."""
    s = skew(q, b)
    eye = jnp.broadcast_to(jnp.eye(b, dtype=q.dtype), s.shape)
    if not neumann:
        return exact_cayley(s)  # R = (I - S)(I + S)^-1
    r = eye
    if terms > 1:
        r = r + 2.0 * s
    if terms > 2:
        power = s @ s
        r = r + 2.0 * power
        for _ in range(3, terms - 1):
            power = power @ s
            r = r + 2.0 * power
        r = r + power @ s  # the last term enters once, as PEFT adds it
    return r


def project_coft(q: jnp.ndarray, b: int, eps: float) -> jnp.ndarray:
    """PEFT's `_project_batch`: each block's skew matrix scaled back onto the ball of radius
    eps / sqrt(#blocks) (Frobenius norm of the whole b x b matrix) when outside it."""
    radius = eps / math.sqrt(q.shape[0])
    norm = jnp.linalg.norm(skew(q, b), axis=(1, 2))[:, None]
    return jnp.where(norm <= radius, q, q * (radius / jnp.where(norm == 0, 1.0, norm)))


@struct.dataclass
class OFTKernel(AdapterNode):
    base: Any
    weight: jnp.ndarray  # [blocks (1 with block_share), b(b-1)/2]: the skew-symmetric parameters
    dropout_key: Any = None
    blocks: int = struct.field(pytree_node=False, default=1)  # r: blocks along the input
    block_size: int = struct.field(pytree_node=False, default=32)
    coft: bool = struct.field(pytree_node=False, default=False)
    eps: float = struct.field(pytree_node=False, default=6e-5)
    use_cayley_neumann: bool = struct.field(pytree_node=False, default=True)
    num_cayley_neumann_terms: int = struct.field(pytree_node=False, default=5)
    module_dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "OFT"

    @property
    def block_share(self) -> bool:
        return self.weight.shape[0] == 1 and self.blocks > 1

    @property
    def dropout(self) -> float:
        return self.module_dropout

    def field_labels(self) -> dict:
        return {"weight": ROTATION}

    def field_axes(self) -> dict:
        return {"weight": ("lora_rank", "lora_rank")}  # small and unrelated to in/out: replicated

    def parameters(self) -> jnp.ndarray:
        """The Q the forward uses: with COFT the projected one, its gradient taken there."""
        q = self.weight.astype(jnp.float32)
        if not self.coft:
            return q
        return q + jax.lax.stop_gradient(project_coft(q, self.block_size, self.eps) - q)

    def rotations(self) -> jnp.ndarray:
        """[blocks, b, b] float32 (module dropout applied when training with a key)."""
        r = cayley(self.parameters(), self.block_size, self.use_cayley_neumann, self.num_cayley_neumann_terms)
        r = jnp.broadcast_to(r, (self.blocks, self.block_size, self.block_size))
        if self.dropout_key is not None and self.module_dropout > 0 and not self.block_share:
            # PEFT's MultiplicativeDropoutLayer: exactly int(p * blocks) blocks, chosen at random, become I
            dropped = jax.random.permutation(self.dropout_key, self.blocks) < int(self.module_dropout * self.blocks)
            r = jnp.where(dropped[:, None, None], jnp.eye(self.block_size, dtype=r.dtype), r)
        return r

    def rotate(self, x: jnp.ndarray) -> jnp.ndarray:
        xs = x.astype(self.weight.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        rotated = jnp.einsum("...rk,rkc->...rc", xs, self.rotations().astype(self.weight.dtype))
        return rotated.reshape(x.shape).astype(x.dtype)

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        return matmul(self.rotate(x), self.base)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        blocks = w.reshape(self.blocks, self.block_size, -1)
        return jnp.einsum("rkc,rco->rko", self.rotations(), blocks).reshape(w.shape)

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        blocks = merged.reshape(self.blocks, self.block_size, -1)
        return jnp.linalg.solve(self.rotations(), blocks).reshape(merged.shape)

    def after_update(self, step) -> "OFTKernel":
        """COFT: keep the stored parameters projected, as PEFT's in-place projection does."""
        if not self.coft:
            return self
        return self.replace(weight=project_coft(self.weight.astype(jnp.float32), self.block_size,
                                                self.eps).astype(self.weight.dtype))


# --- build ----------------------------------------------------------------------------------------

def node_settings(cfg: OFTConfig) -> dict:
    return {"coft": cfg.coft, "eps": cfg.eps, "use_cayley_neumann": cfg.use_cayley_neumann,
            "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms, "module_dropout": cfg.module_dropout}


def build_nodes(bases: dict[str, Any], cfg: OFTConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        blocks, b = blocks_for(base.shape[0], cfg.r, cfg.oft_block_size, name)
        shape = (1 if cfg.block_share else blocks, b * (b - 1) // 2)
        weight = (jnp.zeros(shape, adapter_dtype) if cfg.init_weights
                  else (0.1 * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(adapter_dtype))
        nodes[name] = OFTKernel(base=base, weight=weight, blocks=blocks, block_size=b, **node_settings(cfg))
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, OFTKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "OFT")
    first = next(iter(nodes.values()))
    if any(node_fields(n) != node_fields(first) for n in nodes.values()):
        raise LowraxError("PEFT's OFT config holds one coft/eps/block_share/Cayley setting for every module; these "
                          "OFT nodes differ, so they cannot be written as one PEFT adapter")
    tensors = {f"{PREFIX}{name}{SUFFIX}": np.asarray(node.weight, np.float32) for name, node in nodes.items()}
    # r or oft_block_size: the one every node agrees with (PEFT re-derives each layer's split from it)
    sizes = {n.block_size for n in nodes.values()}
    r, block_size = (0, sizes.pop()) if len(sizes) == 1 else (_common_blocks(nodes), 0)
    return tensors, {"r": r, "oft_block_size": block_size, "module_dropout": first.module_dropout,
                     "coft": first.coft, "eps": first.eps, "block_share": first.block_share,
                     "use_cayley_neumann": first.use_cayley_neumann,
                     "num_cayley_neumann_terms": first.num_cayley_neumann_terms, "init_weights": True,
                     "fan_in_fan_out": False, "bias": "none",
                     # the release whose Cayley-Neumann series this is; PEFT warns without it
                     "peft_version": NEUMANN_SINCE}


def node_fields(node: OFTKernel) -> tuple:
    return node.coft, node.eps, node.block_share, node.use_cayley_neumann, node.num_cayley_neumann_terms


def _common_blocks(nodes: dict[str, OFTKernel]) -> int:
    counts = {n.blocks for n in nodes.values()}
    if len(counts) != 1:
        raise LowraxError("these OFT nodes share neither a block size nor a block count, so no PEFT OFT config "
                          f"(r or oft_block_size) reproduces them: block sizes "
                          f"{sorted({n.block_size for n in nodes.values()})}, counts {sorted(counts)}")
    return counts.pop()


def config_from_peft(config: dict) -> OFTConfig:
    if "oft_block_size" not in config:
        raise CheckpointError("this OFT adapter predates PEFT 0.14 (its config has no oft_block_size); PEFT no longer "
                              "loads that format either: retrain it with a current PEFT")
    if config.get("use_cayley_neumann") and _version(config.get("peft_version")) < _version(NEUMANN_SINCE):
        raise CheckpointError(f"this OFT adapter uses the Cayley-Neumann series of a PEFT release before {NEUMANN_SINCE} "
                              f"(peft_version {config.get('peft_version')!r}), which differs from the current one "
                              "lowrax computes; retrain it with PEFT >= 0.18")
    return OFTConfig(r=int(config.get("r") or 0), oft_block_size=int(config.get("oft_block_size") or 0),
                     module_dropout=float(config.get("module_dropout") or 0.0), coft=bool(config.get("coft")),
                     eps=float(config.get("eps", 6e-5)), block_share=bool(config.get("block_share")),
                     use_cayley_neumann=bool(config.get("use_cayley_neumann", False)),
                     num_cayley_neumann_terms=int(config.get("num_cayley_neumann_terms", 5)))


def _version(text) -> tuple[int, ...]:
    """A release's (major, minor, patch); missing means older than any."""
    if not text:
        return (0,)
    parts = []
    for piece in str(text).partition("@")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    if any(".oft_r." in k for k in tensors):
        raise CheckpointError("this OFT adapter uses the pre-0.14 layout (oft_r tensors), which PEFT no longer loads "
                              "either: retrain it with a current PEFT")
    cfg = config_from_peft(config)
    names = sorted(k[: -len(SUFFIX)] for k in tensors if k.endswith(SUFFIX))
    if not names:
        raise CheckpointError(f"OFT adapter holds no {SUFFIX} tensors")
    nodes, consumed = {}, set()
    for name in names:
        if name not in bases:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}{SUFFIX} targets {name!r}, which is not a linear "
                                  "module of this model")
        blocks, b = blocks_for(bases[name].shape[0], cfg.r, cfg.oft_block_size, name)
        key = name + SUFFIX
        check_shape(name, SUFFIX[1:], tensors[key], (1 if cfg.block_share else blocks, b * (b - 1) // 2))
        nodes[name] = OFTKernel(base=bases[name], weight=jnp.asarray(np.asarray(tensors[key], np.float32), adapter_dtype),
                                blocks=blocks, block_size=b, **node_settings(cfg))
        consumed.add(key)
    return nodes, {}, consumed


def to_config(config: dict) -> tuple[str, OFTConfig]:
    cfg = config_from_peft(config)
    return "oft", dataclasses.replace(cfg, **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="oft", config=OFTConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"oft": lambda: OFTConfig(oft_block_size=8),
                                        "coft": lambda: OFTConfig(oft_block_size=8, coft=True)}))
register_peft_format(PeftFormat(peft_type="OFT", write=write, read=read, to_config=to_config))
