"""PEANuT (Zhong et al. 2024, "PEANuT: Parameter-Efficient Adaptation with Weight-aware Neural Tweakers";
PEFT `PeanutConfig`): the delta is a small network applied to the frozen weight itself, so it follows
the weight's structure rather than being a free low-rank product.

    h = act(base @ a)                                  base [in, out], a [out, r]: each input row of the weight
    encoders: residual_i = h;  h = act(h @ enc_i)      i = 1 .. depth, each [r, r]
    decoders: h = act(h @ dec_i) + residual_(depth + 1 - i)
    delta [in, out] = scaling * h @ b                  b [r, out]
    y = x @ base + x @ delta

PEFT's init (`init_weights=True`): a, the encoders and decoders Kaiming-uniform, b zero (the base
model at init); False draws b Kaiming-uniform too. Merging adds delta (computed from the base);
unmerging restores the base the node holds, as PEFT restores its saved copy.

PEFT format (`peft_type: PEANUT`), torch orientation: `<module>.peanut_A.weight` (r, out) = a.T,
`<module>.peanut_encoders.<i>.weight` and `<module>.peanut_decoders.<i>.weight` (r, r) = enc_i.T,
dec_i.T, `<module>.peanut_B.weight` (out, r) = b.T; `r`, `depth`, `act_fn` and `scaling` in the config.
PEFT implements PEANuT for nn.Linear only: on GPT-2 (Conv1D layers) it trains and merges here, and
saving it for PEFT is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.adapters.delta import DeltaKernel
from lowrax.adapters.init import kaiming_uniform
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import ConfigValueError, Count, PositiveInt, owner_name
from lowrax.core.kernels import dense_kernel
from lowrax.core.layers import ACTIVATIONS, activation
from lowrax.core.node import FACTOR
from lowrax.errors import CheckpointError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, one_setting, refuse_conv1d, torch_layout


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeanutConfig(TargetConfig):
    """PEANuT's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 32  # width of the network applied to the weight
    depth: Count = 0  # encoder / decoder pairs between a and b (0: a, then b)
    act_fn: str = "relu"  # the network's activation (transformers' ACT2FN names)
    scaling: float = 1.0  # multiplies the delta
    init_weights: bool = True  # True: b zero (the base model); False: b Kaiming-uniform too

    def __post_init__(self):
        super().__post_init__()
        if self.act_fn not in ACTIVATIONS:
            raise ConfigValueError(owner_name(self), "act_fn", self.act_fn, f"one of {sorted(ACTIVATIONS)}")


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class PeanutKernel(DeltaKernel):
    """base [in, out] frozen; a [out, r], encoders and decoders [depth, r, r], b [r, out] trained."""

    base: Any
    a: jnp.ndarray
    encoders: jnp.ndarray | None  # None at depth 0 (no zero-size arrays: checkpoints cannot hold them)
    decoders: jnp.ndarray | None
    b: jnp.ndarray
    act_fn: str = struct.field(pytree_node=False, default="relu")
    scaling: float = struct.field(pytree_node=False, default=1.0)
    peft_type = "PEANUT"

    def field_labels(self) -> dict:
        return {"a": FACTOR, "encoders": FACTOR, "decoders": FACTOR, "b": FACTOR}

    def field_axes(self) -> dict:
        return {"a": ("out", "lora_rank"), "encoders": (None, None, None), "decoders": (None, None, None),
                "b": ("lora_rank", "out")}

    @property
    def depth(self) -> int:
        return 0 if self.encoders is None else int(self.encoders.shape[0])

    @property
    def folds_into_base(self) -> bool:
        return True  # the delta is formed from the whole weight anyway

    def delta_of(self, w: jnp.ndarray) -> jnp.ndarray:
        act = activation(self.act_fn)
        f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
        h = act(w @ f32(self.a))
        residuals = []
        if self.encoders is not None:
            for encoder in f32(self.encoders):
                residuals.append(h)
                h = act(h @ encoder)
            for decoder, residual in zip(f32(self.decoders), reversed(residuals)):
                h = act(h @ decoder) + residual
        return self.scaling * (h @ f32(self.b))

    def delta(self) -> jnp.ndarray:
        return self.delta_of(dense_kernel(self.base).astype(jnp.float32))

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta_of(w)

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return w


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: PeanutConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    """PEFT's `reset_peanut_parameters` draws (the same distributions, not torch's numbers)."""
    nodes, r, depth = {}, cfg.r, cfg.depth
    for i, (name, base) in enumerate(bases.items()):
        d_out = base.shape[1]
        k_a, k_e, k_d, k_b = jax.random.split(jax.random.fold_in(key, i), 4)
        b = (jnp.zeros((r, d_out), adapter_dtype) if cfg.init_weights
             else kaiming_uniform(k_b, (r, d_out), r, adapter_dtype))
        nodes[name] = PeanutKernel(base=base, a=kaiming_uniform(k_a, (d_out, r), d_out, adapter_dtype),
                                   encoders=kaiming_uniform(k_e, (depth, r, r), r, adapter_dtype) if depth else None,
                                   decoders=kaiming_uniform(k_d, (depth, r, r), r, adapter_dtype) if depth else None,
                                   b=b,
                                   act_fn=cfg.act_fn, scaling=cfg.scaling)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, PeanutKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "PEANuT")
    r, depth, act_fn, scaling = one_setting(
        ((int(n.a.shape[1]), n.depth, n.act_fn, n.scaling) for n in nodes.values()), "PEANuT",
        "r, depth, act_fn and scaling")
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.peanut_A.weight"] = torch_layout(node.a)
        tensors[f"{PREFIX}{name}.peanut_B.weight"] = torch_layout(node.b)
        for i in range(depth):
            tensors[f"{PREFIX}{name}.peanut_encoders.{i}.weight"] = torch_layout(node.encoders[i])
            tensors[f"{PREFIX}{name}.peanut_decoders.{i}.weight"] = torch_layout(node.decoders[i])
    return tensors, {"r": r, "depth": depth, "act_fn": act_fn, "scaling": scaling, "init_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    r, depth, act_fn = int(config.get("r", 32)), int(config.get("depth", 0)), config.get("act_fn", "relu")
    if act_fn not in ACTIVATIONS:
        raise CheckpointError(f"PEANuT adapter_config.json has act_fn {act_fn!r}; lowrax computes "
                              f"{sorted(ACTIVATIONS)}")
    nodes, used = {}, set()
    for name in adapted_modules(tensors, ".peanut_A.weight", bases, "PEANuT"):
        d_out = bases[name].shape[1]
        fields = {"peanut_A.weight": (r, d_out), "peanut_B.weight": (d_out, r)}
        fields |= {f"peanut_{side}.{i}.weight": (r, r) for side in ("encoders", "decoders") for i in range(depth)}
        arrays = {field: jnp.asarray(adapter_tensor(tensors, name, field, shape, "PEANuT").T, adapter_dtype)
                  for field, shape in fields.items()}
        stacked = {side: (jnp.stack([arrays[f"peanut_{side}.{i}.weight"] for i in range(depth)]) if depth else None)
                   for side in ("encoders", "decoders")}
        nodes[name] = PeanutKernel(base=bases[name], a=arrays["peanut_A.weight"], b=arrays["peanut_B.weight"],
                                   act_fn=act_fn, scaling=float(config.get("scaling", 1.0)), **stacked)
        used |= {f"{name}.{field}" for field in fields}
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, PeanutConfig]:
    return "peanut", PeanutConfig(r=int(config.get("r", 32)), depth=int(config.get("depth", 0)),
                                  act_fn=config.get("act_fn", "relu"), scaling=float(config.get("scaling", 1.0)),
                                  **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="peanut", config=PeanutConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"peanut": lambda: PeanutConfig(r=4, depth=1),
                                        "peanut_plain": lambda: PeanutConfig(r=4)}))
register_peft_format(PeftFormat(peft_type="PEANUT", write=write, read=read, to_config=to_config))
