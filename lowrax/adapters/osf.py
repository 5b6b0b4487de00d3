"""OSF (Orthogonal Subspace Fine-tuning, PEFT `OSFConfig`; for continual learning): each layer's top
singular directions stay frozen and the rest train, with gradients kept orthogonal to the frozen ones.

With PEFT's (out, in) weight W = U S V^T and k = effective_rank (default half the smaller width), the
bottom part U_low [out, m - k], S_low [m - k], V_low [m - k, in] trains, starting at W's own:

    y = x @ base + x @ (U_low S_low V_low - U0 S0 V0)^T     (U0 S0 V0: the bottom part at init)

so the model is the base at init. Before each optimizer step the gradient of U_low loses its part in
the frozen top directions U_high (or, when U has no room beside them, keeps only its part in U0's
span); V_low's likewise (PEFT's gradient hooks). The node keeps the torch layout.

PEFT format (`peft_type: OSF`): `<module>.osf_svd_params.U_low` (out, m - k), `.S_low` (m - k,) and
`.V_low` (m - k, in). PEFT recomputes the initial bottom part from the base it loads over, and so does
lowrax (its product does not depend on the singular vectors' signs). PEFT implements OSF for
`nn.Linear` only: on GPT-2 it trains and merges here, and `save_peft` refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import TargetConfig, check_patterns, pattern_value, targeting_from_peft
from lowrax.core.checked import PositiveFloat, PositiveInt
from lowrax.core.kernels import dense_kernel
from lowrax.core.linear import matmul
from lowrax.core.node import FACTOR, AdapterNode
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, refuse_conv1d

ROLES = ("q", "k", "v", "o", "mlp_in", "mlp_out")  # PEFT's OSF defaults: every projection of the layer


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OSFConfig(TargetConfig):
    """OSF's hyper-parameters, with PEFT's names and defaults."""

    # the frozen top directions: an integer, or a fraction in (0, 1] of the smaller width; None: half
    effective_rank: PositiveInt | PositiveFloat | None = None
    rank_pattern: dict = field(default_factory=dict)  # regex on module name -> effective_rank
    init_weights: bool = True  # False: the trained part starts random (a non-zero adapter, for tests)

    def __post_init__(self):
        super().__post_init__()
        check_patterns(self, "rank_pattern", self.rank_pattern, PositiveInt | PositiveFloat)


def frozen_rank(value, min_dim: int) -> int:
    """PEFT's `_resolve_rank`: None -> half the smaller width; a float in (0, 1] -> that fraction of it."""
    if value is None:
        return min_dim // 2
    rank = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, rank), 0)


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class OSFKernel(AdapterNode):
    """base [in, out] frozen; u_low [out, t], s_low [t], v_low [t, in] trained (torch layout); their
    values at init (u0, s0, v0) and the frozen top directions used to project gradients (`high`:
    U_high [out, k] when out > in, V_high [k, in] when in > out) are frozen."""

    base: Any
    u_low: jnp.ndarray
    s_low: jnp.ndarray
    v_low: jnp.ndarray
    u0: jnp.ndarray
    s0: jnp.ndarray
    v0: jnp.ndarray
    high: Any = None
    peft_type = "OSF"

    def field_labels(self) -> dict:
        return {"u_low": FACTOR, "s_low": FACTOR, "v_low": FACTOR}

    def field_axes(self) -> dict:
        return {"u_low": ("out", None), "s_low": (None,), "v_low": (None, "in"), "u0": ("out", None),
                "s0": (None,), "v0": (None, "in"), "high": (None, None)}

    @staticmethod
    def _through(x: jnp.ndarray, u, s, v) -> jnp.ndarray:
        """x @ (u diag(s) v)^T, as two thin products (no [out, in] array)."""
        return jnp.matmul(jnp.matmul(x, v.T.astype(x.dtype)) * s.astype(x.dtype), u.T.astype(x.dtype))

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        # the trained bottom part in place of the initial one (PEFT concatenates both into one product;
        # two products give the same sum without copying the factors each step)
        y = matmul(x, self.base)
        moved = self._through(x, self.u_low, self.s_low, self.v_low) - self._through(x, self.u0, self.s0, self.v0)
        return y + moved.astype(y.dtype)

    def delta(self) -> jnp.ndarray:
        f32 = jnp.float32
        current = (self.u_low.astype(f32) * self.s_low.astype(f32)[None, :]) @ self.v_low.astype(f32)
        initial = (self.u0.astype(f32) * self.s0.astype(f32)[None, :]) @ self.v0.astype(f32)
        return (current - initial).T

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()

    def precondition_grad(self, grad: "OSFKernel") -> "OSFKernel":
        """PEFT's gradient hooks: U_low's gradient without its part in U_high (or, with no U_high, only its
        part in U0's span); V_low's likewise."""
        d_in, d_out = self.shape
        out = {}
        if grad.u_low is not None:
            g = grad.u_low
            if d_out > d_in:
                high = self.high.astype(g.dtype)
                out["u_low"] = g - high @ (high.T @ g)
            else:
                u0 = self.u0.astype(g.dtype)
                out["u_low"] = u0 @ (u0.T @ g)
        if grad.v_low is not None:
            g = grad.v_low
            if d_in > d_out:
                high = self.high.astype(g.dtype)
                out["v_low"] = g - (g @ high.T) @ high
            else:
                v0 = self.v0.astype(g.dtype)
                out["v_low"] = (g @ v0.T) @ v0
        return grad.replace(**out)


# --- build ----------------------------------------------------------------------------------------

def decomposed(w: jnp.ndarray, k: int) -> dict:
    """PEFT's `decompose_weight_matrix` of the (out, in) weight w^T: the top-k and the rest, in w's dtype."""
    u, s, vt = jnp.linalg.svd(w.astype(jnp.float32).T, full_matrices=False)
    dtype = w.dtype
    return {"u_high": u[:, :k].astype(dtype), "v_high": vt[:k].astype(dtype), "u_low": u[:, k:].astype(dtype),
            "s_low": s[k:].astype(dtype), "v_low": vt[k:].astype(dtype)}


def node_for(base, k: int, trained: dict | None = None) -> OSFKernel:
    """The node over `base` with k frozen directions; `trained`: the trained part (else the init's)."""
    parts = decomposed(dense_kernel(base), k)
    d_in, d_out = base.shape
    high = parts["u_high"] if d_out > d_in else (parts["v_high"] if d_in > d_out else None)
    # the trained part's own buffers: the train step donates them, and the frozen init must survive
    trained = trained or {name: jnp.copy(parts[name]) for name in ("u_low", "s_low", "v_low")}
    return OSFKernel(base=base, u_low=trained["u_low"], s_low=trained["s_low"], v_low=trained["v_low"],
                     u0=parts["u_low"], s0=parts["s_low"], v0=parts["v_low"], high=high)


def build_nodes(bases: dict[str, Any], cfg: OSFConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        k = frozen_rank(pattern_value(name, cfg.rank_pattern, cfg.effective_rank), min(base.shape))
        if k >= min(base.shape):
            raise LowraxError(f"OSF effective_rank {k} for {name} leaves nothing to train (its smaller width is "
                              f"{min(base.shape)}): choose fewer frozen directions")
        node = node_for(base, k)
        if not cfg.init_weights:  # PEFT: randn for each trained part
            ku, ks, kv = jax.random.split(jax.random.fold_in(key, i), 3)
            node = node.replace(u_low=jax.random.normal(ku, node.u_low.shape).astype(node.u_low.dtype),
                                s_low=jax.random.normal(ks, node.s_low.shape).astype(node.s_low.dtype),
                                v_low=jax.random.normal(kv, node.v_low.shape).astype(node.v_low.dtype))
        nodes[name] = node.replace(u_low=node.u_low.astype(adapter_dtype), s_low=node.s_low.astype(adapter_dtype),
                                   v_low=node.v_low.astype(adapter_dtype))
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, OSFKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "OSF")
    tensors, ranks = {}, {}
    for name, node in nodes.items():
        for part, value in (("U_low", node.u_low), ("S_low", node.s_low), ("V_low", node.v_low)):
            tensors[f"{PREFIX}{name}.osf_svd_params.{part}"] = np.asarray(value, np.float32)
        ranks[name] = min(node.shape) - node.s_low.shape[0]
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {name.replace(".", r"\."): int(k) for name, k in ranks.items() if k != common}
    return tensors, {"effective_rank": int(common), "rank_pattern": pattern or None, "init_weights": True,
                     "target_svd_config": None}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    nodes, used = {}, set()
    for name in adapted_modules(tensors, ".osf_svd_params.S_low", bases, "OSF"):
        base = bases[name]
        d_in, d_out = base.shape
        t = tensors[f"{name}.osf_svd_params.S_low"].shape[0]
        k = min(d_in, d_out) - t
        if k < 0:
            raise CheckpointError(f"OSF adapter trains {t} directions of {name}, which has only {min(d_in, d_out)}")
        trained = {"s_low": adapter_tensor(tensors, name, "osf_svd_params.S_low", (t,), "OSF"),
                   "u_low": adapter_tensor(tensors, name, "osf_svd_params.U_low", (d_out, t), "OSF"),
                   "v_low": adapter_tensor(tensors, name, "osf_svd_params.V_low", (t, d_in), "OSF")}
        used |= {f"{name}.osf_svd_params.{p}" for p in ("U_low", "S_low", "V_low")}
        nodes[name] = node_for(base, k, {n: jnp.asarray(v, adapter_dtype) for n, v in trained.items()})
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, OSFConfig]:
    pattern = config.get("rank_pattern") or {}
    return "osf", OSFConfig(effective_rank=config.get("effective_rank"), rank_pattern=pattern,
                            **targeting_from_peft(config))


# --- registration ---------------------------------------------------------------------------------

register_method(AdapterMethod(name="osf", config=OSFConfig, build=build_nodes, default_roles=ROLES,
                              # an eighth of each layer trains: OSF trains full-width factors, and among thousands of
                              # gradient entries some fall near Adam's epsilon, where float rounding between a sharded
                              # and a one-device step is amplified past the conformance tolerance
                              examples={"osf": lambda: OSFConfig(effective_rank=0.875)}))
register_peft_format(PeftFormat(peft_type="OSF", write=write, read=read, to_config=to_config))
