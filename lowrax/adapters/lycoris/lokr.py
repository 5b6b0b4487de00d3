"""LoKr (Edalati et al. 2022, "KronA"; LyCORIS; PEFT `LoKrConfig`): the weight delta is a
Kronecker product of a small matrix and a (possibly low-rank) larger one.

    in = in_m * in_n, out = out_l * out_k          (PEFT's `factorization`, near sqrt or by decompose_factor)
    delta [in, out] = kron(left [in_m, out_l], right [in_n, out_k]) * alpha / r

`right` is low-rank (right_a [in_n, r] @ right_b [r, out_k]) unless r >= max(in_n, out_k) / 2;
`left` is full unless `decompose_both` and r < max(in_m, out_l) / 2. The forward never forms
delta: x [.., in_m, in_n] contracts with left and right directly.

PEFT's init (`init_weights=True`): the left factor (or its a-part) is zero, the rest
Kaiming-uniform; "lycoris" zeroes the right factor (or its b-part) instead.

PEFT format (`peft_type: LOKR`), torch orientation (out, in): `lokr_w1` (out_l, in_m) = left.T
or `lokr_w1_a` (out_l, r) = left_b.T, `lokr_w1_b` (r, in_m) = left_a.T; likewise `lokr_w2*`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.lycoris.common import (LycorisConfig, LycorisKernel,
                                            lycoris_settings, modules_to_build, peft_tensors,
                                            rank_alpha_fields, rank_and_alpha)
from lowrax.adapters.init import kaiming_uniform
from lowrax.core.node import FACTOR
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, targeting_from_peft
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, check_shape

INITS = (True, False, "lycoris")
# ours -> PEFT's (left is PEFT's w1, right its w2; our a-parts are their _b, transposed)
FIELDS = {"left": "lokr_w1", "left_a": "lokr_w1_b", "left_b": "lokr_w1_a",
          "right": "lokr_w2", "right_a": "lokr_w2_b", "right_b": "lokr_w2_a"}


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoKrConfig(LycorisConfig):
    """LoKr's hyper-parameters, with PEFT's names and defaults."""

    decompose_both: bool = False  # also make the left (small) factor low-rank
    decompose_factor: int = -1  # split dimensions as (factor, dim / factor) when it divides; -1: near sqrt
    rank_dropout_scale: bool = False  # rescale rank dropout by the kept share
    init_weights: bool | str = True  # True (left zero), "lycoris" (right zero) or False (all random)

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in INITS:
            raise LowraxError(f"LoKrConfig.init_weights must be true, false or 'lycoris', got {self.init_weights!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of `dimension` into m <= n with m * n = dimension: (factor, dimension / factor)
    when factor divides it, else the divisor pair with the smallest sum whose smaller part stays
    within `factor` (-1: no limit), found by walking divisors up from 1."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        partner = dimension // candidate
        if candidate + partner > m + n or candidate > limit:
            break
        m, n = candidate, partner
    return min(m, n), max(m, n)


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class LoKrKernel(LycorisKernel):
    base: Any
    left: Any = None  # [in_m, out_l] (full) or None
    left_a: Any = None  # [in_m, r]
    left_b: Any = None  # [r, out_l]
    right: Any = None  # [in_n, out_k] (full) or None
    right_a: Any = None  # [in_n, r]
    right_b: Any = None  # [r, out_k]
    dropout_key: Any = None
    rank: int = struct.field(pytree_node=False, default=8)
    alpha: float = struct.field(pytree_node=False, default=8.0)
    rank_dropout: float = struct.field(pytree_node=False, default=0.0)
    module_dropout: float = struct.field(pytree_node=False, default=0.0)
    rescale_rank_dropout: bool = struct.field(pytree_node=False, default=False)
    peft_type = "LOKR"

    def field_labels(self) -> dict:
        return {name: FACTOR for name in FIELDS}

    def field_axes(self) -> dict:
        # the factors' dimensions are divisors of in/out, not in/out themselves: replicated
        return {name: ("lora_rank", "lora_rank") for name in FIELDS}

    def factors(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
        left = f32(self.left) if self.left is not None else f32(self.left_a) @ f32(self.left_b)
        right = f32(self.right) if self.right is not None else f32(self.right_a) @ f32(self.right_b)
        return left, right

    def delta(self) -> jnp.ndarray:
        left, right = self.factors()
        return jnp.kron(left, right) * self.scale

    def delta_output(self, x: jnp.ndarray) -> jnp.ndarray:
        """x @ delta without forming delta: each row of x, seen as X [in_m, in_n], maps to
        left^T X right [out_l, out_k]. Done as two plain 2-D matmuls with a transpose between
        (and one after), the smaller-product factor first: XLA:CPU ran the same contraction as
        one three-operand einsum with layout copies costing more than the products."""
        left, right = self.factors()
        (in_m, out_l), (in_n, out_k) = left.shape, right.shape
        rows = math.prod(x.shape[:-1])
        left, right = left.astype(x.dtype), (right * self.scale).astype(x.dtype)
        if in_m * out_k * (in_n + out_l) <= in_n * out_l * (in_m + out_k):  # right first: fewer multiplications
            t = (x.reshape(rows * in_m, in_n) @ right).reshape(rows, in_m, out_k)
            t = t.swapaxes(1, 2).reshape(rows * out_k, in_m) @ left  # [rows, out_k, out_l]
            y = t.reshape(rows, out_k, out_l).swapaxes(1, 2)
        else:
            t = x.reshape(rows, in_m, in_n).swapaxes(1, 2).reshape(rows * in_n, in_m) @ left  # [rows, in_n, out_l]
            y = t.reshape(rows, in_n, out_l).swapaxes(1, 2).reshape(rows * out_l, in_n) @ right
        return y.reshape(*x.shape[:-1], out_l * out_k)


# --- build ----------------------------------------------------------------------------------------

def _shapes(d_in: int, d_out: int, r: int, cfg: LoKrConfig) -> tuple[tuple, tuple, bool, bool]:
    in_m, in_n = factorization(d_in, cfg.decompose_factor)
    out_l, out_k = factorization(d_out, cfg.decompose_factor)
    full_left = not (cfg.decompose_both and r < max(out_l, in_m) / 2)
    full_right = not (r < max(out_k, in_n) / 2)
    return (in_m, out_l), (in_n, out_k), full_left, full_right


def build_nodes(bases: dict[str, Any], cfg: LoKrConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, name, base, r, alpha in modules_to_build(bases, cfg, "LoKr"):
        d_in, d_out = base.shape
        (in_m, out_l), (in_n, out_k), full_left, full_right = _shapes(d_in, d_out, r, cfg)
        k = iter(jax.random.split(jax.random.fold_in(key, i), 6))
        zero_left, zero_right = cfg.init_weights is True, cfg.init_weights == "lycoris"

        def init(shape, torch_fan_in, zero=False):
            return jnp.zeros(shape, adapter_dtype) if zero else kaiming_uniform(next(k), shape, torch_fan_in, adapter_dtype)

        # torch fan-ins: w (out, in) -> in; w_a (out, r) -> r; w_b (r, in) -> in
        fields = {}
        if full_left:
            fields["left"] = init((in_m, out_l), in_m, zero_left)
        else:
            fields["left_a"], fields["left_b"] = init((in_m, r), in_m), init((r, out_l), r, zero_left)
        if full_right:
            fields["right"] = init((in_n, out_k), in_n, zero_right)
        else:
            fields["right_a"], fields["right_b"] = init((in_n, r), in_n, zero_right), init((r, out_k), r)
        nodes[name] = LoKrKernel(base=base, rank=r, alpha=alpha, rank_dropout=cfg.rank_dropout,
                                 module_dropout=cfg.module_dropout, rescale_rank_dropout=cfg.rank_dropout_scale,
                                 **fields)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, LoKrKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    tensors = peft_tensors(nodes, FIELDS, "LoKr", model)
    # decompose_both, when any left factor is low-rank: PEFT re-derives the layout from it
    decompose_both = any(n.left is None for n in nodes.values())
    return tensors, rank_alpha_fields(nodes) | {
        "init_weights": True, "use_effective_conv2d": False, "decompose_both": decompose_both,
        "decompose_factor": _decompose_factor(nodes), "rank_dropout_scale": any(n.rescale_rank_dropout
                                                                                for n in nodes.values())}


def _decompose_factor(nodes: dict[str, LoKrKernel]) -> int:
    """-1 when every node's split is the near-sqrt one; else the one factor that gives every split."""
    def splits(node):
        left, right = node.factors()
        return left.shape, right.shape

    def matches(factor):
        for node in nodes.values():
            (in_m, out_l), (in_n, out_k) = splits(node)
            if (factorization(in_m * in_n, factor), factorization(out_l * out_k, factor)) != ((in_m, in_n), (out_l, out_k)):
                return False
        return True

    if matches(-1):
        return -1
    candidates = sorted({s for node in nodes.values() for s in splits(node)[0]})  # in_m and out_l: the factor
    for factor in candidates:
        if matches(factor):
            return factor
    raise LowraxError("these LoKr nodes split their dimensions in ways no single decompose_factor gives; "
                      "PEFT's format cannot describe them")


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in ("lokr_w1", "lokr_w1_a")})
    if not names:
        raise CheckpointError("LoKr adapter holds no .lokr_w1 or .lokr_w1_a tensors")
    if any(k.endswith(".lokr_t2") for k in tensors):
        raise CheckpointError("LoKr adapter holds convolution (CP-decomposed, lokr_t2) tensors; "
                              "lowrax adapts linear layers only")
    cfg = LoKrConfig(decompose_both=bool(config.get("decompose_both")),
                     decompose_factor=int(config.get("decompose_factor", -1)))
    nodes, consumed = {}, set()
    for name in names:
        if name not in bases:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}.lokr_w1 targets {name!r}, which is not a linear "
                                  "module of this model")
        d_in, d_out = bases[name].shape
        r, alpha = rank_and_alpha(name, config)
        (in_m, out_l), (in_n, out_k), full_left, full_right = _shapes(d_in, d_out, r, cfg)
        expected = {"left": (out_l, in_m), "left_b": (out_l, r), "left_a": (r, in_m),
                    "right": (out_k, in_n), "right_b": (out_k, r), "right_a": (r, in_n)}
        wanted = (["left"] if full_left else ["left_a", "left_b"]) + (["right"] if full_right else ["right_a", "right_b"])
        fields = {}
        for ours in wanted:
            key = f"{name}.{FIELDS[ours]}"
            if key not in tensors:
                raise CheckpointError(f"LoKr adapter lacks {PREFIX}{key} (r={r}, decompose_both="
                                      f"{cfg.decompose_both} give this layout for {name})")
            check_shape(name, FIELDS[ours], tensors[key], expected[ours])
            fields[ours] = jnp.asarray(np.asarray(tensors[key], np.float32).T, adapter_dtype)
            consumed.add(key)
        nodes[name] = LoKrKernel(base=bases[name], rank=r, alpha=alpha,
                                 rank_dropout=float(config.get("rank_dropout") or 0.0),
                                 module_dropout=float(config.get("module_dropout") or 0.0),
                                 rescale_rank_dropout=bool(config.get("rank_dropout_scale")), **fields)
    return nodes, {}, consumed


def to_config(config: dict) -> tuple[str, LoKrConfig]:
    init = config.get("init_weights", True)
    return "lokr", LoKrConfig(**lycoris_settings(config), **targeting_from_peft(config),
                              decompose_both=bool(config.get("decompose_both")),
                              decompose_factor=int(config.get("decompose_factor", -1)),
                              rank_dropout_scale=bool(config.get("rank_dropout_scale")),
                              init_weights=init if init in INITS else True)


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="lokr", config=LoKrConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"lokr": lambda: LoKrConfig(r=2)}))
register_peft_format(PeftFormat(peft_type="LOKR", write=write, read=read, to_config=to_config))
