"""RandLoRA (Albert et al. 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models";
PEFT `RandLoraConfig`): a full-rank update from shared frozen random bases, each layer training only
their scalings. With m = min(in, out), M = max(in, out) and n = ceil(m / r) bases:

    A [r, 1, m_max], B [M_max, n_max, r]    frozen, shared by every layer (params["randlora_shared"])
    small = (lambda[:, :, None] * A[:, :, :m] * gamma[None]).reshape(r n, m)   lambda [r, n], gamma [n, m] trained
    large = B[:M, :n].reshape(M, n r)
    y = x @ base + s * (x @ small^T) @ large^T    when in <= out    (s = randlora_alpha / r)
    y = x @ base + s * (x @ large) @ small        otherwise

The two flattenings pair the rank and basis indices in different orders; that is PEFT's definition
and kept as is. PEFT's init: lambda = 0, gamma = 1 / max(n, m), so the model is the base at init;
the bases are Kaiming-uniform (or ternary with `sparse` / `very_sparse`) divided by their standard
deviation.

PEFT format (`peft_type: RANDLORA`, `save_projection: true`): `base_model.randlora_A` (r, 1, m_max),
`base_model.randlora_B` (M_max, n_max, r), `<module>.randlora_lambda` (r, n), `<module>.randlora_gamma`
(n, m); PEFT also writes each layer's copy of the two bases, which lowrax reads (they must equal the
shared ones) and does not write. Files saved without the bases (PEFT regenerates them from torch's
generator) are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.init import kaiming_uniform
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import PositiveFloat, PositiveInt, Probability
from lowrax.core.linear import matmul
from lowrax.core.node import VECTOR, AdapterNode, dropped, shared_entry
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, fan_in_fan_out, one_setting

SHARED = "randlora_shared"  # the tree's top-level key for the bases
SHARED_A, SHARED_B = "base_model.randlora_A", "base_model.randlora_B"  # PEFT's


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RandLoraConfig(TargetConfig):
    """RandLoRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 32  # the rank of each random basis
    randlora_alpha: PositiveFloat = 640.0  # scale = randlora_alpha / r
    randlora_dropout: Probability = 0.0  # training: dropout on the adapter path's input
    sparse: bool = False  # ternary bases (-1, 0, 1 with probability 1/6, 2/3, 1/6)
    very_sparse: bool = False  # ternary bases with sparsity sqrt(m): mostly zeros
    init_weights: bool = True  # False: lambda ~ N(0, 1), gamma = 1 / M (a non-zero adapter, for tests)


def bases_count(d_in: int, d_out: int, r: int) -> int:
    """n = ceil(min(in, out) / r): enough rank-r bases for a full-rank update."""
    return -(-min(d_in, d_out) // r)


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class RandLoraKernel(AdapterNode):
    """base [in, out] frozen; lambda [r, n] and gamma [n, m] trained; `a` [r, 1, m] and `b` [M, n, r]
    are None as stored and bound to slices of the shared bases by `bind_shared`."""

    base: Any
    lambda_: jnp.ndarray
    gamma: jnp.ndarray
    dropout_key: Any = None
    a: Any = None
    b: Any = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "RANDLORA"

    def bind_shared(self, params: dict) -> "RandLoraKernel":
        shared = shared_entry(params, SHARED, "a RandLoRA kernel needs the shared bases")
        n, m = self.gamma.shape
        return self.replace(a=shared["a"][:, :, :m], b=shared["b"][: max(self.shape), :n])

    def field_axes(self) -> dict:
        return {"lambda_": (None, None), "gamma": (None, None)}

    def field_labels(self) -> dict:
        return {"lambda_": VECTOR, "gamma": VECTOR}

    def factors(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(left [in, n r], right [n r, out]) in float32, with y = x @ base + s * x @ left @ right."""
        if self.a is None:
            raise LowraxError("RandLoRA kernel used without its shared bases; call the model with the whole tree")
        r, n = self.lambda_.shape
        m = self.gamma.shape[1]
        small = (self.lambda_.astype(jnp.float32)[:, :, None] * self.a.astype(jnp.float32)
                 * self.gamma.astype(jnp.float32)[None]).reshape(r * n, m)
        large = self.b.astype(jnp.float32).reshape(self.b.shape[0], n * r)
        d_in, d_out = self.shape
        return (small.T, large.T) if d_in <= d_out else (large, small)

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        left, right = (f.astype(x.dtype) for f in self.factors())
        h = jnp.matmul(dropped(x, self.dropout, self.dropout_key), left)
        return y + (jnp.matmul(h, (self.scale * right).astype(x.dtype))).astype(y.dtype)

    def delta(self) -> jnp.ndarray:
        left, right = self.factors()
        return self.scale * (left @ right)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()


# --- build ----------------------------------------------------------------------------------------

def shared_bases(key, r: int, m_max: int, big_max: int, n_max: int, sparsity: float | None) -> dict:
    """PEFT's distributions (not torch's numbers): Kaiming-uniform (bound 1 / sqrt(fan_in), as torch's
    kaiming_uniform_ with a = sqrt(5)), or ternary, each divided by its standard deviation."""
    ka, kb = jax.random.split(key)
    if sparsity is None:
        a = kaiming_uniform(ka, (r, 1, m_max), m_max)
        b = kaiming_uniform(kb, (big_max, n_max, r), r)
    else:
        def ternary(k, shape):
            u = jax.random.uniform(k, shape, jnp.float32)
            return jnp.where(u < 1 / (2 * sparsity), -1.0, jnp.where(u > 1 - 1 / (2 * sparsity), 1.0, 0.0))

        a, b = ternary(ka, (r, 1, m_max)), ternary(kb, (big_max, n_max, r))
    return {"a": a / jnp.std(a, ddof=1), "b": b / jnp.std(b, ddof=1)}


def build_nodes(bases: dict[str, Any], cfg: RandLoraConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    max_in = max(w.shape[0] for w in bases.values())
    max_out = max(w.shape[1] for w in bases.values())
    m_max, big_max = min(max_in, max_out), max(max_in, max_out)
    sparsity = math.sqrt(m_max) if cfg.very_sparse else (3.0 if cfg.sparse else None)
    shared = shared_bases(jax.random.fold_in(key, 0), cfg.r, m_max, big_max, bases_count(max_in, max_out, cfg.r),
                          sparsity)
    nodes = {}
    for i, (name, w) in enumerate(bases.items()):
        d_in, d_out = w.shape
        n, m = bases_count(d_in, d_out, cfg.r), min(d_in, d_out)
        if cfg.init_weights:
            lambda_, gamma = jnp.zeros((cfg.r, n)), jnp.full((n, m), 1.0 / max(n, m))
        else:
            lambda_, gamma = jax.random.normal(jax.random.fold_in(key, i + 1), (cfg.r, n)), jnp.full((n, m), 1.0 / max(d_in, d_out))
        nodes[name] = RandLoraKernel(base=w, lambda_=lambda_.astype(adapter_dtype), gamma=gamma.astype(adapter_dtype),
                                     scale=cfg.randlora_alpha / cfg.r, dropout=cfg.randlora_dropout)
    return nodes, {SHARED: {k: v.astype(adapter_dtype) for k, v in shared.items()}}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, RandLoraKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    shared = params.get(SHARED)
    if shared is None:
        raise LowraxError(f"RandLoRA params lack their shared bases at params[{SHARED!r}]")
    r, scale, dropout = one_setting(((int(n.lambda_.shape[0]), n.scale, n.dropout) for n in nodes.values()),
                                    "RandLoRA", "r, randlora_alpha and randlora_dropout")
    tensors = {SHARED_A: np.asarray(shared["a"], np.float32), SHARED_B: np.asarray(shared["b"], np.float32)}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.randlora_lambda"] = np.asarray(node.lambda_, np.float32)
        tensors[f"{PREFIX}{name}.randlora_gamma"] = np.asarray(node.gamma, np.float32)
    return tensors, {"r": r, "randlora_alpha": round(scale * r, 6), "randlora_dropout": dropout,
                     "projection_prng_key": 0, "save_projection": True, "sparse": False, "very_sparse": False,
                     "fan_in_fan_out": fan_in_fan_out(model), "bias": "none", "init_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    if SHARED_A not in tensors or SHARED_B not in tensors:
        raise CheckpointError(
            f"RandLoRA adapter without {SHARED_A} / {SHARED_B}: it was saved with save_projection=false, and PEFT's "
            "bases come from torch's random generator, which lowrax cannot reproduce; save it with save_projection=true")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"RandLoRA adapter_config.json has bias {config.get('bias')!r}; lowrax reads bias 'none' "
                              "(PEFT's default) only")
    r = int(config.get("r", 32))
    a_t, b_t = tensors[SHARED_A], tensors[SHARED_B]
    if a_t.ndim != 3 or b_t.ndim != 3 or a_t.shape[:2] != (r, 1) or b_t.shape[2] != r:
        raise CheckpointError(f"RandLoRA bases {SHARED_A} {tuple(a_t.shape)} and {SHARED_B} {tuple(b_t.shape)} do not "
                              f"match r={r}: expected (r, 1, min_dim) and (max_dim, bases, r)")
    nodes, used = {}, {SHARED_A, SHARED_B}
    scale = float(config.get("randlora_alpha", 640)) / r
    for name in adapted_modules(tensors, ".randlora_lambda", bases, "RandLoRA"):
        d_in, d_out = bases[name].shape
        n, m = bases_count(d_in, d_out, r), min(d_in, d_out)
        if m > a_t.shape[2] or max(d_in, d_out) > b_t.shape[0] or n > b_t.shape[1]:
            raise CheckpointError(f"RandLoRA bases cover min_dim={a_t.shape[2]}, max_dim={b_t.shape[0]}, "
                                  f"{b_t.shape[1]} bases, but {name} needs {m}, {max(d_in, d_out)} and {n}")
        lambda_ = adapter_tensor(tensors, name, "randlora_lambda", (r, n), "RandLoRA")
        gamma = adapter_tensor(tensors, name, "randlora_gamma", (n, m), "RandLoRA")
        used |= {f"{name}.randlora_lambda", f"{name}.randlora_gamma"}
        for key, full in ((f"{name}.randlora_A", a_t), (f"{name}.randlora_B", b_t)):  # PEFT also saves each layer's
            if key in tensors:                                                        # reference to the shared bases
                if tensors[key].shape != full.shape or not np.array_equal(tensors[key], full):
                    raise CheckpointError(f"adapter tensor {PREFIX}{key} differs from the shared {key.rsplit('.', 1)[1]}")
                used.add(key)
        nodes[name] = RandLoraKernel(base=bases[name], lambda_=jnp.asarray(lambda_, adapter_dtype),
                                     gamma=jnp.asarray(gamma, adapter_dtype), scale=scale,
                                     dropout=float(config.get("randlora_dropout") or 0.0))
    return nodes, {SHARED: {"a": jnp.asarray(a_t, adapter_dtype), "b": jnp.asarray(b_t, adapter_dtype)}}, used


def to_config(config: dict) -> tuple[str, RandLoraConfig]:
    return "randlora", RandLoraConfig(r=config.get("r", 32), randlora_alpha=float(config.get("randlora_alpha", 640)),
                                      randlora_dropout=float(config.get("randlora_dropout") or 0.0),
                                      **targeting_from_peft(config))


# --- registration ---------------------------------------------------------------------------------

register_method(AdapterMethod(name="randlora", config=RandLoraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              shared_keys=(SHARED,), examples={"randlora": lambda: RandLoraConfig(r=4, randlora_alpha=8.0)}))
register_peft_format(PeftFormat(peft_type="RANDLORA", write=write, read=read, to_config=to_config))
