"""SHiRA (Bhardwaj et al. 2024, "Sparse High Rank Adapters"; PEFT `ShiraConfig`): a layer trains a
fixed sparse set of its weight's entries, r * (in + out) of them (as many as LoRA of rank r trains),
at positions drawn once at random.

    delta [in, out]: the trained values at their positions, zero elsewhere
    y = x @ (base + delta)

The positions are those of PEFT's `random_mask`: the first r * (in + out) entries of torch's
`randperm(out * in)` from a generator seeded with `random_seed` (a fresh generator's seed when None, as
in PEFT), in row-major (out, in) order (`adapters.torch_random` reproduces it without torch). PEFT saves
the positions next to the values, so a file is read whatever seed made it. Values start at zero with
`init_weights=True` (the base model); `False` draws them standard normal.

PEFT format (`peft_type: SHIRA`): `<module>.shira_weight` (k,) and `<module>.shira_indices` (2, k) int,
rows (out) then columns (in); `r`, `mask_type: random` and `random_seed` in the config. PEFT implements
SHiRA for nn.Linear only: on GPT-2 (Conv1D layers) it trains and merges here, and saving it for PEFT is
refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.delta import DeltaKernel
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.adapters.torch_random import TORCH_DEFAULT_SEED, torch_randperm_head
from lowrax.core.checked import Count, PositiveInt
from lowrax.core.node import FACTOR
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import (PREFIX, adapted_modules, adapter_tensor, check_shape, fan_in_fan_out, one_setting, refuse_conv1d)


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShiraConfig(TargetConfig):
    """SHiRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 32  # a layer trains r * (in + out) of its weights
    mask_type: Literal["random"] = "random"  # PEFT's built-in mask (its custom mask_fn is Python code: not a config)
    random_seed: Count | None = None  # seeds the positions; None: a fresh torch generator's seed, as PEFT
    init_weights: bool = True  # True: values zero (the base model); False: standard normal


@functools.lru_cache(maxsize=64)
def mask_positions(d_out: int, d_in: int, r: int, seed: int | None) -> np.ndarray:
    """(2, k) int32: the rows (out) and columns (in) of PEFT's random mask, row-major sorted (every layer of
    a shape gets the same mask from the same seed, as in PEFT: computed once per shape)."""
    k = r * (d_in + d_out)
    flat = np.sort(torch_randperm_head(d_out * d_in, k, TORCH_DEFAULT_SEED if seed is None else int(seed)))
    return np.stack([flat // d_in, flat % d_in]).astype(np.int32)


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class ShiraKernel(DeltaKernel):
    """base [in, out] frozen; values [k] trained, at the (out, in) positions `indices` [2, k] (frozen)."""

    base: Any
    values: jnp.ndarray
    indices: jnp.ndarray  # int32, frozen: an array (not a static field) so files with any positions load
    peft_type = "SHIRA"

    def field_labels(self) -> dict:
        return {"values": FACTOR}

    def field_axes(self) -> dict:
        return {"values": (None,), "indices": (None, None)}

    @property
    def folds_into_base(self) -> bool:
        return True

    def delta(self) -> jnp.ndarray:
        d_in, d_out = self.base.shape
        rows, cols = self.indices[0], self.indices[1]
        return jnp.zeros((d_in, d_out), jnp.float32).at[cols, rows].add(self.values.astype(jnp.float32))


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: ShiraConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        d_in, d_out = base.shape
        k = cfg.r * (d_in + d_out)
        if k > d_in * d_out:
            raise LowraxError(f"SHiRA r={cfg.r} would train {k} weights of {name}, which has only {d_in * d_out} "
                              f"({d_out} x {d_in}); lower r")
        values = (jnp.zeros((k,), adapter_dtype) if cfg.init_weights
                  else jax.random.normal(jax.random.fold_in(key, i), (k,), jnp.float32).astype(adapter_dtype))
        indices = jnp.asarray(mask_positions(d_out, d_in, cfg.r, cfg.random_seed))
        nodes[name] = ShiraKernel(base=base, values=values, indices=indices)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, ShiraKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "SHiRA")
    r = one_setting((int(n.values.shape[0]) // sum(n.base.shape) for n in nodes.values()), "SHiRA", "r")
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.shira_weight"] = np.asarray(node.values, np.float32)
        tensors[f"{PREFIX}{name}.shira_indices"] = np.asarray(node.indices, np.int32)
    return tensors, {"r": r, "mask_type": "random", "random_seed": None, "fan_in_fan_out": fan_in_fan_out(model),
                     "init_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    nodes, used = {}, set()
    r = int(config.get("r", 32))
    for name in adapted_modules(tensors, ".shira_weight", bases, "SHiRA"):
        d_in, d_out = bases[name].shape
        k = r * (d_in + d_out)
        values = adapter_tensor(tensors, name, "shira_weight", (k,), "SHiRA")
        key = f"{name}.shira_indices"
        if key not in tensors:
            raise CheckpointError(f"SHiRA adapter lacks {PREFIX}{key}")
        check_shape(name, "shira_indices", tensors[key], (2, k))
        indices = np.asarray(tensors[key]).astype(np.int64)  # PEFT on Windows writes them as float32
        if (indices < 0).any() or (indices[0] >= d_out).any() or (indices[1] >= d_in).any():
            raise CheckpointError(f"adapter tensor {PREFIX}{key} holds positions outside {name}'s {d_out} x {d_in} weight")
        nodes[name] = ShiraKernel(base=bases[name], values=jnp.asarray(values, adapter_dtype),
                                  indices=jnp.asarray(indices, jnp.int32))
        used |= {f"{name}.shira_weight", key}
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, ShiraConfig]:
    seed = config.get("random_seed")
    return "shira", ShiraConfig(r=int(config.get("r", 32)), random_seed=None if seed is None else int(seed),
                                **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="shira", config=ShiraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"shira": lambda: ShiraConfig(r=1)}))
register_peft_format(PeftFormat(peft_type="SHIRA", write=write, read=read, to_config=to_config))
