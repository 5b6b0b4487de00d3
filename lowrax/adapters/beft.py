"""BEFT (Huang et al. 2025, "BEFT: Bias-Efficient Fine-Tuning of Language Models"; PEFT `BeftConfig`):
a trained bias vector added to each targeted layer's output, by default the value projections only.

    out = x @ base + bias + b          b [out], zero at init (the model starts as the base)

Merging adds b to the layer's bias; a layer without a bias has nowhere to put it, so merging is
refused there, as in PEFT (keep the adapter unmerged).

PEFT format (`peft_type: BEFT`): `<module>.beft_bias` of shape (1, out). PEFT implements BEFT for
nn.Linear only: on GPT-2 (Conv1D layers) it trains and merges here, and saving it for PEFT is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import TargetConfig, targeting_from_peft
from lowrax.core.linear import matmul
from lowrax.core.node import VECTOR, AdapterNode
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, refuse_conv1d

VALUE_ONLY = ("v",)  # PEFT's default targets: the attention's value projection


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BeftConfig(TargetConfig):
    """BEFT's hyper-parameters, with PEFT's names and defaults."""

    init_weights: bool = True  # True: b = 0 (the base model); False: b ~ N(0, 1), PEFT's untouched draw


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class BeftKernel(AdapterNode):
    """base [in, out] frozen; bias_delta [out] trained."""

    base: Any
    bias_delta: jnp.ndarray
    peft_type = "BEFT"
    merges_into_bias = True  # merging needs the layer's own bias (tree.merge refuses a layer without one)

    def field_labels(self) -> dict:
        return {"bias_delta": VECTOR}

    def field_axes(self) -> dict:
        return {"bias_delta": ("out",)}

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        return y + self.bias_delta.astype(y.dtype)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged

    def merge_bias(self, bias: jnp.ndarray) -> jnp.ndarray:
        return bias + self.bias_delta.astype(jnp.float32)

    def unmerge_bias(self, merged_bias: jnp.ndarray) -> jnp.ndarray:
        return merged_bias - self.bias_delta.astype(jnp.float32)


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: BeftConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        d_out = base.shape[1]
        b = (jnp.zeros((d_out,), jnp.float32) if cfg.init_weights
             else jax.random.normal(jax.random.fold_in(key, i), (d_out,), jnp.float32))
        nodes[name] = BeftKernel(base=base, bias_delta=b.astype(adapter_dtype))
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, BeftKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "BEFT")
    tensors = {f"{PREFIX}{name}.beft_bias": np.asarray(node.bias_delta, np.float32)[None, :]
               for name, node in nodes.items()}
    return tensors, {"init_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    nodes, used = {}, set()
    for name in adapted_modules(tensors, ".beft_bias", bases, "BEFT"):
        d_out = bases[name].shape[1]
        b = adapter_tensor(tensors, name, "beft_bias", (1, d_out), "BEFT")
        nodes[name] = BeftKernel(base=bases[name], bias_delta=jnp.asarray(b[0], adapter_dtype))
        used.add(f"{name}.beft_bias")
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, BeftConfig]:
    return "beft", BeftConfig(**targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="beft", config=BeftConfig, build=build_nodes, default_roles=VALUE_ONLY,
                              examples={"beft": lambda: BeftConfig()}))
register_peft_format(PeftFormat(peft_type="BEFT", write=write, read=read, to_config=to_config))
