"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning"): a learned vector rescales each targeted layer.

    feedforward module:   y = (x * l) W + b            l [in]
    other modules:        y = (x W + b) * l            l [out]  (the bias is scaled too, as PEFT does)

l starts at ones (PEFT's `init_ia3_weights=True`), so the model is unchanged at
init. Merging folds l into the kernel (rows or columns) and, for output scaling,
into the bias; unmerging divides it out again (a zero entry cannot be unmerged).

PEFT format (`peft_type: IA3`): `base_model.model.<module>.ia3_l`, shaped (1, in)
for feedforward modules and (out, 1) for the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.core.node import VECTOR, AdapterNode
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import TargetConfig, check_regex, default_targets, targeting_from_peft
from lowrax.errors import CheckpointError, LowraxError
from lowrax.core.linear import matmul
from lowrax.peft.common import PREFIX, fan_in_fan_out

# The roles IA3 adapts by default, and those whose input (not output) it scales.
DEFAULT_ROLES = ("k", "v", "mlp_out")
FEEDFORWARD_ROLES = ("mlp_out",)


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IA3Config(TargetConfig):
    """IA3's hyper-parameters, with PEFT's names and defaults (targeting fields: `TargetConfig`'s)."""

    # Modules whose input (not output) is scaled: names (a module matches when its name ends
    # with one, PEFT's rule) or one regex; None: PEFT's default for the model type.
    feedforward_modules: str | tuple[str, ...] | None = None
    init_ia3_weights: bool = True  # True: vectors of ones (the base model); False: standard normal, as PEFT

    def __post_init__(self):
        super().__post_init__()
        check_regex(self, "feedforward_modules", self.feedforward_modules)
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            raise LowraxError(f"IA3Config.feedforward_modules {list(ff)} must be a subset of target_modules {list(targets)} "
                              "(PEFT's rule)")


def is_feedforward(name: str, spec: str | Sequence[str] | None) -> bool:
    """PEFT's feedforward rule: a regex matches the full name; names match as plain suffixes."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(s) for s in spec)


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class IA3Kernel(AdapterNode):
    """base [in, out] frozen; vector [in] (feedforward) or [out] trained."""

    base: Any
    vector: jnp.ndarray
    feedforward: bool = struct.field(pytree_node=False, default=False)
    peft_type = "IA3"

    def field_axes(self) -> dict:
        return {"vector": ("in",) if self.feedforward else ("out",)}

    def field_labels(self) -> dict:
        return {"vector": VECTOR}

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.feedforward:
            return matmul(x * self.vector.astype(x.dtype), self.base)
        y = matmul(x, self.base)
        return y * self.vector.astype(y.dtype)

    def project(self, x: jnp.ndarray, bias: jnp.ndarray | None) -> jnp.ndarray:
        if self.feedforward or bias is None:
            return super().project(x, bias)
        y = matmul(x, self.base)
        return (y + bias.astype(y.dtype)) * self.vector.astype(y.dtype)

    def _scale(self) -> jnp.ndarray:
        """The vector broadcast over the [in, out] kernel, float32."""
        v = self.vector.astype(jnp.float32)
        return v[:, None] if self.feedforward else v[None, :]

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w * self._scale()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged / self._scale()

    def merge_bias(self, bias: jnp.ndarray) -> jnp.ndarray:
        return bias if self.feedforward else bias * self.vector.astype(jnp.float32)

    def unmerge_bias(self, merged_bias: jnp.ndarray) -> jnp.ndarray:
        return merged_bias if self.feedforward else merged_bias / self.vector.astype(jnp.float32)


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: IA3Config, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    ff_spec = cfg.feedforward_modules
    if ff_spec is None:
        ff_spec = default_targets("ia3_feedforward", FEEDFORWARD_ROLES, model_type)
        if ff_spec is None:
            raise LowraxError(f"IA3 has no default feedforward_modules for model_type {model_type!r}; "
                              "set feedforward_modules (a list, or [] for none)")
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        ff = is_feedforward(name, ff_spec)
        size = base.shape[0] if ff else base.shape[1]
        if cfg.init_ia3_weights:
            vector = jnp.ones((size,), adapter_dtype)
        else:
            vector = jax.random.normal(jax.random.fold_in(key, i), (size,), jnp.float32).astype(adapter_dtype)
        nodes[name] = IA3Kernel(base=base, vector=vector, feedforward=ff)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def _feedforward_spec(nodes: dict[str, IA3Kernel]) -> Any:
    """`feedforward_modules` for PEFT: suffixes when PEFT's suffix rule selects exactly the
    feedforward nodes among the targeted ones, else an exact regex of their names."""
    ff = {n for n, node in nodes.items() if node.feedforward}
    suffixes = sorted({n.split(".")[-1] for n in ff})
    if {n for n in nodes if is_feedforward(n, suffixes)} == ff:
        return suffixes
    return "^(" + "|".join(sorted(n.replace(".", r"\.") for n in ff)) + ")$"


def write(nodes: dict[str, IA3Kernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    tensors = {}
    for name, node in nodes.items():
        v = np.asarray(node.vector, np.float32)
        tensors[f"{PREFIX}{name}.ia3_l"] = v[None, :] if node.feedforward else v[:, None]
    return tensors, {"feedforward_modules": _feedforward_spec(nodes), "fan_in_fan_out": fan_in_fan_out(model),
                     "init_ia3_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    ff_spec = config.get("feedforward_modules")
    names = sorted(k[: -len(".ia3_l")] for k in tensors if k.endswith(".ia3_l"))
    if not names:
        raise CheckpointError("IA3 adapter holds no .ia3_l tensors")
    nodes = {}
    for name in names:
        if name not in bases:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}.ia3_l targets {name!r}, which is not a linear module of this model")
        d_in, d_out = bases[name].shape
        ff = is_feedforward(name, ff_spec)
        expected = (1, d_in) if ff else (d_out, 1)
        vector = tensors[f"{name}.ia3_l"]
        if tuple(vector.shape) != expected:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}.ia3_l has shape {tuple(vector.shape)}, expected {expected} "
                                  f"({'a feedforward' if ff else 'an output-scaling'} module per feedforward_modules={ff_spec!r})")
        nodes[name] = IA3Kernel(base=bases[name], vector=jnp.asarray(vector.reshape(-1), adapter_dtype), feedforward=ff)
    return nodes, {}, {f"{n}.ia3_l" for n in names}


def to_config(config: dict) -> tuple[str, IA3Config]:
    ff = config.get("feedforward_modules")
    return "ia3", IA3Config(feedforward_modules=ff if isinstance(ff, str) or ff is None else tuple(ff),
                            **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="ia3", config=IA3Config, build=build_nodes, default_roles=DEFAULT_ROLES,
                              examples={"ia3": lambda: IA3Config()}))
register_peft_format(PeftFormat(peft_type="IA3", write=write, read=read, to_config=to_config))
