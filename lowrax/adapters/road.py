"""RoAd (Liao et al. 2024, "2D Rotary Adaptation for Efficient Parameter-Efficient Fine-Tuning"; PEFT
`RoadConfig`): the layer's output is rotated and scaled in 2-D planes. Outputs come in groups of
`group_size`; output i of a group's first half and output i of its second half form a plane.

    y = x @ base + bias;   out = y * c + rotate_half(y) * s      rotate_half: (y1, y2) -> (-y2, y1) per group
    road_1:  c = alpha cos(theta), s = alpha sin(theta), theta and alpha shared by the plane's two outputs
    road_2:  one theta and alpha per output
    road_4:  c = alpha_1 cos(theta_1), s = alpha_2 sin(theta_2), four numbers per output

PEFT's init (`init_weights=True`): theta 0 and alpha 1, so the model starts as the base; False draws
theta ~ N(0, 0.5) and alpha ~ N(1, 0.5). Merging applies the transform to the kernel's output columns
and to the bias; unmerging inverts each plane's 2 x 2 map.

PEFT format (`peft_type: ROAD`): `<module>.road_theta` and `<module>.road_alpha`, each (out / 2,),
(out,) or (2 out,) for road_1 / road_2 / road_4; `variant` and `group_size` in the config. PEFT implements
RoAd for nn.Linear only: on GPT-2 (Conv1D layers) it trains and merges here, and saving it for PEFT is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import ConfigValueError, PositiveInt, owner_name
from lowrax.core.linear import matmul
from lowrax.core.node import VECTOR, AdapterNode
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, one_setting, refuse_conv1d

SIZES = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters per output, for theta and for alpha


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoadConfig(TargetConfig):
    """RoAd's hyper-parameters, with PEFT's names and defaults."""

    variant: Literal["road_1", "road_2", "road_4"] = "road_1"
    group_size: PositiveInt = 64  # outputs per group (even; divides every targeted output width)
    init_weights: bool = True  # True: theta 0, alpha 1 (the base model); False: random

    def __post_init__(self):
        super().__post_init__()
        if self.group_size % 2:
            raise ConfigValueError(owner_name(self), "group_size", self.group_size,
                                   "an even number (a group pairs its two halves)")


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class RoadKernel(AdapterNode):
    """base [in, out] frozen; theta and alpha [out / 2], [out] or [2 out] trained."""

    base: Any
    theta: jnp.ndarray
    alpha: jnp.ndarray
    variant: str = struct.field(pytree_node=False, default="road_1")
    group_size: int = struct.field(pytree_node=False, default=64)
    peft_type = "ROAD"

    def field_labels(self) -> dict:
        return {"theta": VECTOR, "alpha": VECTOR}

    def field_axes(self) -> dict:
        return {"theta": (None,), "alpha": (None,)}

    def coefficients(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(c, s) [out], float32: out = y * c + rotate_half(y) * s."""
        theta, alpha, g = self.theta.astype(jnp.float32), self.alpha.astype(jnp.float32), self.group_size
        if self.variant == "road_1":
            theta = jnp.repeat(theta.reshape(-1, g // 2), 2, axis=0).reshape(-1)
            alpha = jnp.repeat(alpha.reshape(-1, g // 2), 2, axis=0).reshape(-1)
        if self.variant == "road_4":
            theta, alpha = theta.reshape(-1, 2, g), alpha.reshape(-1, 2, g)
            return (alpha[:, 0] * jnp.cos(theta[:, 0])).reshape(-1), (alpha[:, 1] * jnp.sin(theta[:, 1])).reshape(-1)
        return alpha * jnp.cos(theta), alpha * jnp.sin(theta)

    def _halves(self, y: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        grouped = y.reshape(*y.shape[:-1], -1, 2, self.group_size // 2)
        return grouped[..., 0, :], grouped[..., 1, :]

    def rotate(self, y: jnp.ndarray) -> jnp.ndarray:
        c, s = (v.astype(y.dtype) for v in self.coefficients())
        y1, y2 = self._halves(y)
        rotated = jnp.stack([-y2, y1], axis=-2).reshape(y.shape)
        return y * c + rotated * s

    def unrotate(self, out: jnp.ndarray) -> jnp.ndarray:
        """The y that `rotate` maps to out: each plane's 2 x 2 map inverted."""
        c, s = (v.astype(out.dtype) for v in self.coefficients())
        (o1, o2), (c1, c2), (s1, s2) = self._halves(out), self._halves(c), self._halves(s)
        det = c1 * c2 + s1 * s2  # out1 = c1 y1 - s1 y2, out2 = s2 y1 + c2 y2
        y1, y2 = (c2 * o1 + s1 * o2) / det, (c1 * o2 - s2 * o1) / det
        return jnp.stack([y1, y2], axis=-2).reshape(out.shape)

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.rotate(matmul(x, self.base))

    def project(self, x: jnp.ndarray, bias: jnp.ndarray | None) -> jnp.ndarray:
        y = matmul(x, self.base)
        return self.rotate(y if bias is None else y + bias.astype(y.dtype))

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return self.rotate(w)

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return self.unrotate(merged)

    def merge_bias(self, bias: jnp.ndarray) -> jnp.ndarray:
        return self.rotate(bias.astype(jnp.float32))

    def unmerge_bias(self, merged_bias: jnp.ndarray) -> jnp.ndarray:
        return self.unrotate(merged_bias.astype(jnp.float32))


# --- build ----------------------------------------------------------------------------------------

def parameter_count(name: str, d_out: int, variant: str, group_size: int, error=LowraxError) -> int:
    if variant not in SIZES:
        raise error(f"RoAd variant must be one of {sorted(SIZES)}, got {variant!r}")
    if d_out % group_size:
        raise error(f"RoAd group_size {group_size} must divide {name}'s output width {d_out}")
    return int(d_out * SIZES[variant])


def build_nodes(bases: dict[str, Any], cfg: RoadConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        size = parameter_count(name, base.shape[1], cfg.variant, cfg.group_size)
        if cfg.init_weights:
            theta, alpha = jnp.zeros((size,), adapter_dtype), jnp.ones((size,), adapter_dtype)
        else:
            k_t, k_a = jax.random.split(jax.random.fold_in(key, i))
            theta = (0.5 * jax.random.normal(k_t, (size,), jnp.float32)).astype(adapter_dtype)
            alpha = (1.0 + 0.5 * jax.random.normal(k_a, (size,), jnp.float32)).astype(adapter_dtype)
        nodes[name] = RoadKernel(base=base, theta=theta, alpha=alpha, variant=cfg.variant, group_size=cfg.group_size)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, RoadKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "RoAd")
    variant, group_size = one_setting(((n.variant, n.group_size) for n in nodes.values()), "RoAd",
                                      "variant and group_size")
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.road_theta"] = np.asarray(node.theta, np.float32)
        tensors[f"{PREFIX}{name}.road_alpha"] = np.asarray(node.alpha, np.float32)
    return tensors, {"variant": variant, "group_size": group_size, "init_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    variant, group_size = config.get("variant", "road_1"), int(config.get("group_size", 64))
    if group_size < 2 or group_size % 2:
        raise CheckpointError(f"RoAd adapter_config.json has group_size {group_size}; expected an even number")
    nodes, used = {}, set()
    for name in adapted_modules(tensors, ".road_theta", bases, "RoAd"):
        size = parameter_count(name, bases[name].shape[1], variant, group_size, error=CheckpointError)
        arrays = {part: jnp.asarray(adapter_tensor(tensors, name, f"road_{part}", (size,), "RoAd"), adapter_dtype)
                  for part in ("theta", "alpha")}
        nodes[name] = RoadKernel(base=bases[name], variant=variant, group_size=group_size, **arrays)
        used |= {f"{name}.road_theta", f"{name}.road_alpha"}
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, RoadConfig]:
    return "road", RoadConfig(variant=config.get("variant", "road_1"), group_size=int(config.get("group_size", 64)),
                              **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="road", config=RoadConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"road": lambda: RoadConfig(variant="road_4", group_size=8)}))
register_peft_format(PeftFormat(peft_type="ROAD", write=write, read=read, to_config=to_config))
