"""LN tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention: Towards Efficient
Multi-Modal LLM Finetuning"; PEFT `LNTuningConfig`): the targeted normalisation layers
are trained in full, everything else stays frozen.

Each array of a targeted norm (its `scale`, and `bias` where it has one) becomes a
`TunedNorm` node holding the original (`base`, frozen) and the trained copy (`value`,
starting equal to it). Model code reads `value` (`adapters.node.resolve`), so no model
needs a hook; merging keeps the trained values, unmerging puts the nodes back.

PEFT format (`peft_type: LN_TUNING`): `base_model.model.<norm module>.ln_tuning_layers.weight`
(and `.bias`), the whole trained copy of the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.core.node import FULL, AdapterNode, is_adapter
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import TargetConfig, norm_modules, targeting_from_peft
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, target_spec

MARK = ".ln_tuning_layers."
HF_NAMES = {"scale": "weight", "bias": "bias"}  # a lowrax norm's arrays -> the torch module's parameters

# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LNTuningConfig(TargetConfig):
    """LN tuning has no hyper-parameters beyond which norms it trains (`TargetConfig`'s fields,
    matched against normalisation modules: `input_layernorm`, `LayerNorm`, `ln_1`, ...)."""


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class TunedNorm(AdapterNode):
    base: Any  # the original array, frozen
    value: Any  # the trained copy, read by the model
    peft_type = "LN_TUNING"
    stands_for_array = True

    def with_value(self, array) -> "TunedNorm":
        return self.replace(value=array)

    def field_labels(self) -> dict:
        return {"value": FULL}

    def field_axes(self) -> dict:
        return {}  # sharded like the norm array itself (dist.sharding)

    def apply(self, x):
        raise LowraxError("a TunedNorm is a normalisation layer's array, not a linear layer; models read its value")


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, dict], cfg: LNTuningConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for name, module in bases.items():
        if any(is_adapter(a) for a in module.values()):
            raise LowraxError(f"{name} is already adapted; merge it first")
        # The trained copy is in the adapters' dtype (float32 over a bfloat16 base, as every method's arrays) and
        # its own buffer: the step donates the trained half, while a reference with adapters off reads `base`.
        nodes[name] = {field: TunedNorm(base=array, value=jnp.array(array, dtype=adapter_dtype, copy=True))
                       for field, array in module.items()}
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, TunedNorm], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    tensors, modules = {}, set()
    for name, node in nodes.items():
        module, field = name.rsplit(".", 1)
        tensors[f"{PREFIX}{module}{MARK}{HF_NAMES[field]}"] = np.asarray(node.value, np.float32)
        modules.add(module)
    targets = target_spec(dict.fromkeys(modules), model, existing=set(norm_modules(params)))
    return tensors, {"target_modules": targets}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    names = sorted({k.split(MARK)[0] for k in tensors if MARK in k})
    if not names:
        raise CheckpointError(f"LN tuning adapter holds no {MARK.strip('.')} tensors")
    nodes, consumed = {}, set()
    for name in names:
        if name not in bases:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}{MARK}weight targets {name!r}, which is not a "
                                  "normalisation module of this model")
        module = {}
        for field, array in bases[name].items():
            key = f"{name}{MARK}{HF_NAMES[field]}"
            if key not in tensors:
                raise CheckpointError(f"LN tuning adapter lacks {PREFIX}{key}")
            if tuple(tensors[key].shape) != tuple(array.shape):
                raise CheckpointError(f"adapter tensor {PREFIX}{key} has shape {tuple(tensors[key].shape)}, "
                                      f"expected {tuple(array.shape)} for this module")
            module[field] = TunedNorm(base=array, value=jnp.asarray(tensors[key], array.dtype))
            consumed.add(key)
        nodes[name] = module
    return nodes, {}, consumed


def to_config(config: dict) -> tuple[str, LNTuningConfig]:
    return "ln_tuning", LNTuningConfig(**targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="ln_tuning", config=LNTuningConfig, build=build_nodes,
                              default_roles=("norms",), modules=norm_modules, module_kind="normalisation",
                              examples={"ln_tuning": lambda: LNTuningConfig()}))
register_peft_format(PeftFormat(peft_type="LN_TUNING", write=write, read=read, to_config=to_config,
                                modules=norm_modules))
