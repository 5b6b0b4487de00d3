"""PVeRA (arXiv 2512.07703, "Probabilistic Vector-based Random Matrix Adaptation"; PEFT `PveraConfig`):
VeRA whose scaled projection is a distribution. One frozen random pair is shared by every layer,
A [max_in, 2r] and B [r, max_out], sliced per layer; each layer trains lambda_d [2r] and lambda_b [out]:

    h = lambda_d * (dropout(x) @ A[:in]);  mu, logvar = h[:, :r], h[:, r:]
    z = mu + eps * exp(logvar / 2)   (training; eps ~ N(0, 1), fresh each step)    z = mu   (otherwise)
    y = x @ base + lambda_b * (z @ B[:, :out])

Merging adds the mean's weight, (A[:in, :r] * lambda_d[:r]) @ (B[:, :out] * lambda_b). PEFT's init:
lambda_d = d_initial (0.1), lambda_b = 0, so the model is the base at init; the projections are
Kaiming-uniform. The pair lives once at `params["pvera_shared"]` and is bound inside the traced forward.

PEFT format (`peft_type: PVERA`, `save_projection: true`): `base_model.pvera_A` (2r, max_in),
`base_model.pvera_B` (max_out, r), `<module>.pvera_lambda_b` (out,), `<module>.pvera_lambda_d` (2r,).
Adapters saved without the projections (PEFT regenerates them from torch's generator) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.init import kaiming_uniform
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import PositiveInt, Probability
from lowrax.core.linear import matmul
from lowrax.adapters.lora.vera import VeraKernel
from lowrax.core.node import dropped, shared_entry
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, fan_in_fan_out, one_setting, torch_layout

SHARED = "pvera_shared"  # the tree's top-level key for the projections
SHARED_A, SHARED_B = "base_model.pvera_A", "base_model.pvera_B"  # PEFT's


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PveraConfig(TargetConfig):
    """PVeRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 256  # the shared projections' rank (may exceed a layer's width, as VeRA's)
    pvera_dropout: Probability = 0.0  # training: dropout on the adapter path's input
    d_initial: float = 0.1  # lambda_d's start
    init_weights: bool = True  # False: lambda_b = 1, lambda_d ~ N(0, 1) (a non-zero adapter, for tests)


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class PveraKernel(VeraKernel):
    """VeRA's fields (base frozen; lambda_d, here [2r], and lambda_b [out] trained; `a` [in, 2r] and
    `b` [r, out] bound to slices of the shared projections by `bind_shared`). `dropout_key` is
    attached in every training step: it also draws the sampling noise."""

    peft_type = "PVERA"
    samples_in_training = True  # tree.with_dropout_keys gives it a key even without dropout

    @property
    def rank(self) -> int:
        return self.lambda_d.shape[0] // 2

    def bind_shared(self, params: dict) -> "PveraKernel":
        shared = shared_entry(params, SHARED, "a PVeRA kernel needs the shared projections")
        d_in, d_out = self.shape
        return self.replace(a=shared["a"][:d_in, : 2 * self.rank], b=shared["b"][: self.rank, :d_out])

    def field_axes(self) -> dict:
        return {"lambda_b": ("out",), "lambda_d": (None,)}

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.a is None:
            raise LowraxError("PVeRA kernel used without its shared projections; call the model with the whole tree")
        y = matmul(x, self.base)
        dropout_key = noise_key = None
        if self.dropout_key is not None:
            dropout_key, noise_key = jax.random.split(self.dropout_key)
        h = jnp.matmul(dropped(x, self.dropout, dropout_key), self.a.astype(x.dtype)) * self.lambda_d.astype(x.dtype)
        z, log_variance = h[:, : self.rank], h[:, self.rank:]
        if noise_key is not None:
            z = z + jax.random.normal(noise_key, z.shape, z.dtype) * jnp.exp(0.5 * log_variance)
        return y + (jnp.matmul(z, self.b.astype(x.dtype)) * self.lambda_b.astype(x.dtype)).astype(y.dtype)

    def delta(self) -> jnp.ndarray:
        r = self.rank
        a = self.a[:, :r].astype(jnp.float32) * self.lambda_d[:r].astype(jnp.float32)[None, :]
        return a @ (self.b.astype(jnp.float32) * self.lambda_b.astype(jnp.float32)[None, :])


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: PveraConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    """PEFT's draws (Kaiming-uniform projections on its (2r, max_in) and (max_out, r) layouts: bounds
    1/sqrt(max_in) and 1/sqrt(r)), not torch's numbers."""
    max_in = max(w.shape[0] for w in bases.values())
    max_out = max(w.shape[1] for w in bases.values())
    r = cfg.r
    ka, kb = jax.random.split(jax.random.fold_in(key, 0))
    shared = {"a": kaiming_uniform(ka, (max_in, 2 * r), max_in), "b": kaiming_uniform(kb, (r, max_out), r)}
    nodes = {}
    for i, (name, w) in enumerate(bases.items()):
        if cfg.init_weights:
            lambda_d, lambda_b = jnp.full((2 * r,), cfg.d_initial), jnp.zeros((w.shape[1],))
        else:
            lambda_d, lambda_b = jax.random.normal(jax.random.fold_in(key, i + 1), (2 * r,)), jnp.ones((w.shape[1],))
        nodes[name] = PveraKernel(base=w, lambda_d=lambda_d.astype(adapter_dtype), lambda_b=lambda_b.astype(adapter_dtype),
                                  dropout=cfg.pvera_dropout)
    return nodes, {SHARED: {k: v.astype(adapter_dtype) for k, v in shared.items()}}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, PveraKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    shared = params.get(SHARED)
    if shared is None:
        raise LowraxError(f"PVeRA params lack their shared projections at params[{SHARED!r}]")
    r, dropout = one_setting(((n.rank, n.dropout) for n in nodes.values()), "PVeRA", "r and pvera_dropout")
    tensors = {SHARED_A: torch_layout(shared["a"]), SHARED_B: torch_layout(shared["b"])}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.pvera_lambda_b"] = np.asarray(node.lambda_b, np.float32)
        tensors[f"{PREFIX}{name}.pvera_lambda_d"] = np.asarray(node.lambda_d, np.float32)
    return tensors, {"r": r, "projection_prng_key": 0, "save_projection": True, "pvera_dropout": dropout,
                     "d_initial": 0.1, "fan_in_fan_out": fan_in_fan_out(model), "bias": "none", "init_weights": True,
                     "sample_at_inference": False, "generator_seed": None}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    if SHARED_A not in tensors or SHARED_B not in tensors:
        raise CheckpointError(
            f"PVeRA adapter without {SHARED_A} / {SHARED_B}: it was saved with save_projection=false, and PEFT's "
            "projections come from torch's random generator, which lowrax cannot reproduce; save it with "
            "save_projection=true")
    if config.get("sample_at_inference"):
        raise CheckpointError("this PVeRA adapter samples at inference (sample_at_inference: true); lowrax's forward "
                              "outside training uses the mean, so its outputs would differ: save it with false")
    r = int(config.get("r", 256))
    a_t, b_t = tensors[SHARED_A], tensors[SHARED_B]
    if a_t.ndim != 2 or b_t.ndim != 2 or a_t.shape[0] != 2 * r or b_t.shape[1] != r:
        raise CheckpointError(f"PVeRA projections {SHARED_A} {tuple(a_t.shape)} and {SHARED_B} {tuple(b_t.shape)} do "
                              f"not match r={r}: expected (2r, max_in) and (max_out, r)")
    shared = {"a": jnp.asarray(a_t.T, adapter_dtype), "b": jnp.asarray(b_t.T, adapter_dtype)}
    nodes, used = {}, {SHARED_A, SHARED_B}
    for name in adapted_modules(tensors, ".pvera_lambda_b", bases, "PVeRA"):
        d_in, d_out = bases[name].shape
        if d_in > a_t.shape[1] or d_out > b_t.shape[0]:
            raise CheckpointError(f"PVeRA projections cover in={a_t.shape[1]}, out={b_t.shape[0]}, but {name} needs "
                                  f"in={d_in}, out={d_out}")
        lambda_b = adapter_tensor(tensors, name, "pvera_lambda_b", (d_out,), "PVeRA")
        lambda_d = adapter_tensor(tensors, name, "pvera_lambda_d", (2 * r,), "PVeRA")
        used |= {f"{name}.pvera_lambda_b", f"{name}.pvera_lambda_d"}
        nodes[name] = PveraKernel(base=bases[name], lambda_d=jnp.asarray(lambda_d, adapter_dtype),
                                  lambda_b=jnp.asarray(lambda_b, adapter_dtype),
                                  dropout=float(config.get("pvera_dropout") or 0.0))
    return nodes, {SHARED: shared}, used


def to_config(config: dict) -> tuple[str, PveraConfig]:
    return "pvera", PveraConfig(r=config.get("r", 256), pvera_dropout=float(config.get("pvera_dropout") or 0.0),
                                d_initial=float(config.get("d_initial", 0.1)), **targeting_from_peft(config))


# --- registration ---------------------------------------------------------------------------------

register_method(AdapterMethod(name="pvera", config=PveraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              shared_keys=(SHARED,), examples={"pvera": lambda: PveraConfig(r=4)}))
register_peft_format(PeftFormat(peft_type="PVERA", write=write, read=read, to_config=to_config))
