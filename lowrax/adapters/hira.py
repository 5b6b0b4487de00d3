"""HiRA (Huang et al. 2025, "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language
Models"; PEFT `HiraConfig`): the delta is the frozen weight times, element-wise, a rank-r product, so
its rank is not bounded by r.

    delta [in, out] = base * (a @ b)        a [in, r], b [r, out]
    y = x @ base + dropout(x) @ delta

PEFT's init (`init_weights=True`): a Kaiming-uniform, b zero (the base model at init); `"gaussian"`
draws a with standard deviation 1 / r; `False` draws both standard normal. Merging scales the kernel
by (1 + a @ b); unmerging restores the base.

PEFT format (`peft_type: HIRA`), torch orientation: `<module>.hira_A` (r, in) = a.T, `<module>.hira_B`
(out, r) = b.T; `r` and `rank_pattern` in the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.adapters.delta import DeltaKernel
from lowrax.adapters.init import kaiming_uniform
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, check_patterns, pattern_value, targeting_from_peft
from lowrax.core.checked import PositiveInt, Probability
from lowrax.core.kernels import dense_kernel
from lowrax.core.node import FACTOR, dropped
from lowrax.errors import LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, fan_in_fan_out, torch_layout, value_and_pattern


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HiraConfig(TargetConfig):
    """HiRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 32  # rank of the product the frozen weight is multiplied by
    hira_dropout: Probability = 0.0  # training: dropout on the adapter path's input
    rank_pattern: dict = field(default_factory=dict)  # regex on module name -> its rank
    # True: a Kaiming-uniform, b zero (the base model); "gaussian": a normal (std 1 / r), b zero;
    # False: both standard normal
    init_weights: bool | Literal["gaussian"] = True

    def __post_init__(self):
        super().__post_init__()
        check_patterns(self, "rank_pattern", self.rank_pattern, PositiveInt)


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class HiraKernel(DeltaKernel):
    """base [in, out] frozen; a [in, r] and b [r, out] trained."""

    base: Any
    a: jnp.ndarray
    b: jnp.ndarray
    dropout_key: Any = None
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "HIRA"

    def field_labels(self) -> dict:
        return {"a": FACTOR, "b": FACTOR}

    def field_axes(self) -> dict:
        return {"a": ("in", "lora_rank"), "b": ("lora_rank", "out")}

    def product(self) -> jnp.ndarray:
        return self.a.astype(jnp.float32) @ self.b.astype(jnp.float32)

    @property
    def folds_into_base(self) -> bool:
        return self.dropout == 0.0 or self.dropout_key is None

    def delta(self) -> jnp.ndarray:
        return dense_kernel(self.base).astype(jnp.float32) * self.product()

    def delta_output(self, x: jnp.ndarray) -> jnp.ndarray:
        return dropped(x, self.dropout, self.dropout_key) @ self.delta().astype(x.dtype)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w * (1.0 + self.product())

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - w * self.product()


# --- build ----------------------------------------------------------------------------------------

def initial_factors(key, d_in: int, d_out: int, r: int, init, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """PEFT's `reset_hira_parameters` draws (the same distributions, not torch's numbers)."""
    k_a, k_b = jax.random.split(key)
    if init is True:
        return kaiming_uniform(k_a, (d_in, r), d_in, dtype), jnp.zeros((r, d_out), dtype)
    if init == "gaussian":
        return (jax.random.normal(k_a, (d_in, r), jnp.float32) / r).astype(dtype), jnp.zeros((r, d_out), dtype)
    if init is False:
        return (jax.random.normal(k_a, (d_in, r), jnp.float32).astype(dtype),
                jax.random.normal(k_b, (r, d_out), jnp.float32).astype(dtype))
    raise LowraxError(f"HiraConfig.init_weights must be True, False or 'gaussian', got {init!r}")


def build_nodes(bases: dict[str, Any], cfg: HiraConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        r = int(pattern_value(name, cfg.rank_pattern, cfg.r))
        a, b = initial_factors(jax.random.fold_in(key, i), *base.shape, r, cfg.init_weights, adapter_dtype)
        nodes[name] = HiraKernel(base=base, a=a, b=b, dropout=cfg.hira_dropout)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, HiraKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    ranks = {name: int(node.a.shape[1]) for name, node in nodes.items()}
    common, pattern = value_and_pattern(ranks)
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.hira_A"] = torch_layout(node.a)
        tensors[f"{PREFIX}{name}.hira_B"] = torch_layout(node.b)
    return tensors, {"r": common, "rank_pattern": pattern,
                     "hira_dropout": max(node.dropout for node in nodes.values()),
                     "fan_in_fan_out": fan_in_fan_out(model), "init_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    nodes, used = {}, set()
    for name in adapted_modules(tensors, ".hira_A", bases, "HiRA"):
        d_in, d_out = bases[name].shape
        r = int(pattern_value(name, config.get("rank_pattern"), config.get("r", 32)))
        a = adapter_tensor(tensors, name, "hira_A", (r, d_in), "HiRA").T
        b = adapter_tensor(tensors, name, "hira_B", (d_out, r), "HiRA").T
        nodes[name] = HiraKernel(base=bases[name], a=jnp.asarray(a, adapter_dtype), b=jnp.asarray(b, adapter_dtype),
                                 dropout=float(config.get("hira_dropout") or 0.0))
        used |= {f"{name}.hira_A", f"{name}.hira_B"}
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, HiraConfig]:
    return "hira", HiraConfig(r=int(config.get("r", 32)), hira_dropout=float(config.get("hira_dropout") or 0.0),
                              rank_pattern=dict(config.get("rank_pattern") or {}), **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="hira", config=HiraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"hira": lambda: HiraConfig(r=2)}))
register_peft_format(PeftFormat(peft_type="HIRA", write=write, read=read, to_config=to_config))
