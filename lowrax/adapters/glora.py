"""GLoRA (Chavan et al. 2023, "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning"; PEFT
`GloraConfig`): a layer's weight and bias are both re-parameterised by trained "support tensors".

In PEFT's (out, in) layout, with W the weight and b the bias:

    W' = W + W * A + B                 (A, B: `config_A_B`)
    b' = b + b * D + E + W C           (C: `config_C`; D, E: `config_D_E`; only for layers with a bias)

where each support tensor is, by its configuration, a rank-`r` product ("lora": down [rows, r] @ up
[r, cols]), a column vector broadcast across the row ("vector"), one trained number ("constant"), or
absent ("none"). PEFT's defaults: A, B "lora", C "lora", D, E "constant". At init every up-projection
is Kaiming-uniform and everything else zero, so the layer is the base. The step forms W' densely.

PEFT format (`peft_type: GLORA`): `<module>.glora_<P>.Xd` / `.Xu` (lora) or `.X` (vector, constant);
absent paths are zero buffers PEFT also writes (`.zeros`), which lowrax reads and does not write.
PEFT implements GLoRA for `nn.Linear` only: on GPT-2 it trains and merges here, and `save_peft`
refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.init import kaiming_uniform
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import PositiveInt
from lowrax.core.kernels import dense_kernel
from lowrax.core.linear import dense_matmul
from lowrax.core.node import FACTOR, AdapterNode
from lowrax.errors import CheckpointError
from lowrax.peft.common import PREFIX, one_setting, refuse_conv1d

PATHS = "ABCDE"


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GloraConfig(TargetConfig):
    """GLoRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 8  # rank of the "lora" support tensors
    config_A_B: Literal["lora", "vector", "constant", "none"] = "lora"  # the weight's scale A and shift B
    config_C: Literal["lora", "vector", "none"] = "lora"  # the bias term W C
    config_D_E: Literal["vector", "constant", "none"] = "constant"  # the bias's scale D and shift E
    init_weights: bool = True  # False: every support tensor random (a non-zero adapter, for tests)


def path_kinds(configured: tuple[str, str, str], has_bias: bool) -> dict[str, str]:
    """{path: kind} for one layer from (config_A_B, config_C, config_D_E); C, D and E exist only where
    the layer has a bias (as in PEFT)."""
    ab, c, de = configured
    return {"A": ab, "B": ab, "C": c if has_bias else "none", "D": de if has_bias else "none",
            "E": de if has_bias else "none"}


def shapes_of(path: str, kind: str, d_in: int, d_out: int, r: int) -> dict[str, tuple]:
    """The trained arrays of one support tensor, PEFT's names and (torch) shapes."""
    rows, cols = {"A": (d_out, d_in), "B": (d_out, d_in), "C": (d_in, 1)}.get(path, (d_out, None))
    if kind == "lora":
        return {"Xd": (rows, r), "Xu": (r, cols)}
    if kind == "vector":
        return {"X": (rows, 1) if path in "ABC" else (rows,)}
    if kind == "constant":
        return {"X": (1,)}
    return {}


def _value(kind: str, arrays: dict):
    """The support tensor: a [rows, cols] product, a [rows, 1] or [rows] vector, a number, or 0."""
    if kind == "lora":
        return arrays["Xd"].astype(jnp.float32) @ arrays["Xu"].astype(jnp.float32)
    if kind == "vector":
        return arrays["X"].astype(jnp.float32)
    if kind == "constant":
        return arrays["X"].astype(jnp.float32)[0]
    return 0.0


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class GloraKernel(AdapterNode):
    """base [in, out] frozen; `support` {path: {PEFT's array name: array}} trained (torch layout);
    `configured` (config_A_B, config_C, config_D_E) and `has_bias`, static."""

    base: Any
    support: dict
    configured: tuple = struct.field(pytree_node=False, default=("lora", "lora", "constant"))
    has_bias: bool = struct.field(pytree_node=False, default=False)
    peft_type = "GLORA"

    @property
    def kinds(self) -> dict[str, str]:
        return path_kinds(self.configured, self.has_bias)

    def field_labels(self) -> dict:
        return {"support": FACTOR}

    def field_axes(self) -> dict:
        return {"support": ()}  # small tensors, replicated

    def _support(self, path: str):
        return _value(self.kinds[path], self.support.get(path, {}))

    def weight(self) -> jnp.ndarray:
        """W' in lowrax's [in, out] layout, float32."""
        w = dense_kernel(self.base).astype(jnp.float32).T  # PEFT's (out, in)
        return (w + w * self._support("A") + self._support("B")).T

    def effective_bias(self, bias: jnp.ndarray) -> jnp.ndarray:
        b = bias.astype(jnp.float32)
        w = dense_kernel(self.base).astype(jnp.float32).T
        c = self._support("C")
        wc = (w @ c)[:, 0] if not isinstance(c, float) else 0.0
        return b + b * self._support("D") + self._support("E") + wc

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        return dense_matmul(x, self.weight().astype(x.dtype))

    def project(self, x: jnp.ndarray, bias) -> jnp.ndarray:
        y = self.apply(x)
        return y if bias is None else y + self.effective_bias(bias).astype(y.dtype)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return self.weight()

    def merge_bias(self, bias: jnp.ndarray) -> jnp.ndarray:
        return self.effective_bias(bias)

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return w  # the node keeps the base it was built on, as PEFT's unmerge recovers it

    def unmerge_bias(self, merged_bias: jnp.ndarray) -> jnp.ndarray:
        w = dense_kernel(self.base).astype(jnp.float32).T
        c = self._support("C")
        wc = (w @ c)[:, 0] if not isinstance(c, float) else 0.0
        return (merged_bias.astype(jnp.float32) - self._support("E") - wc) / (1.0 + self._support("D"))


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: GloraConfig, key, adapter_dtype, model_type=None, *,
                biases: dict) -> tuple[dict, dict]:
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        d_in, d_out = base.shape
        configured = (cfg.config_A_B, cfg.config_C, cfg.config_D_E)
        kinds = path_kinds(configured, biases.get(name) is not None)
        support = {}
        for j, path in enumerate(PATHS):
            arrays = {}
            for k, (field, shape) in enumerate(shapes_of(path, kinds[path], d_in, d_out, cfg.r).items()):
                sub = jax.random.fold_in(jax.random.fold_in(key, i), 8 * j + k)
                if field == "Xu":
                    value = kaiming_uniform(sub, shape, shape[1])  # PEFT: Kaiming up-projections, zero down-projections
                elif cfg.init_weights:
                    value = jnp.zeros(shape)
                elif shape == (1,):
                    value = 0.02 * jax.random.normal(sub, shape)
                else:
                    value = kaiming_uniform(sub, shape, shape[1] if len(shape) == 2 else shape[0])
                arrays[field] = value.astype(adapter_dtype)
            if arrays:
                support[path] = arrays
        nodes[name] = GloraKernel(base=base, support=support, configured=configured,
                                  has_bias=biases.get(name) is not None)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, GloraKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "GLoRA")
    tensors = {}
    for name, node in nodes.items():
        for path, arrays in node.support.items():
            for field, value in arrays.items():
                tensors[f"{PREFIX}{name}.glora_{path}.{field}"] = np.asarray(value, np.float32)
    ab, c, de = one_setting((n.configured for n in nodes.values()), "GLoRA", "config_A_B, config_C and config_D_E")
    r = _rank(nodes)
    return tensors, {"r": r, "config_A_B": ab, "config_C": c, "config_D_E": de, "init_weights": True, "bias": "none"}


def _rank(nodes: dict[str, GloraKernel]) -> int:
    ranks = {a["Xd"].shape[1] for n in nodes.values() for a in n.support.values() if "Xd" in a}
    return one_setting(ranks or {8}, "GLoRA", "r")


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    r = int(config.get("r", 8))
    configured = (config.get("config_A_B", "lora"), config.get("config_C", "lora"), config.get("config_D_E", "constant"))
    nodes, used = {}, set()
    names = sorted({k.split(".glora_", 1)[0] for k in tensors if ".glora_" in k})
    if not names:
        raise CheckpointError("GLoRA adapter holds no glora_ tensors")
    for name in names:
        if name not in bases:
            raise CheckpointError(f"adapter tensors {PREFIX}{name}.glora_* target {name!r}, which is not a linear "
                                  "module of this model")
        d_in, d_out = bases[name].shape
        # a layer with a bias has trained C, D or E (unless configured "none", when they do nothing)
        has_bias = any(k.startswith(f"{name}.glora_{p}.X") for p in "CDE" for k in tensors)
        kinds = path_kinds(configured, has_bias)
        support = {}
        for path in PATHS:
            arrays = {}
            for field, shape in shapes_of(path, kinds[path], d_in, d_out, r).items():
                key = f"{name}.glora_{path}.{field}"
                if key not in tensors:
                    raise CheckpointError(f"GLoRA adapter lacks {PREFIX}{key} ({path} is {kinds[path]!r})")
                if tuple(tensors[key].shape) != shape:
                    raise CheckpointError(f"adapter tensor {PREFIX}{key} has shape {tuple(tensors[key].shape)}, "
                                          f"expected {shape}")
                arrays[field] = jnp.asarray(tensors[key], adapter_dtype)
                used.add(key)
            if arrays:
                support[path] = arrays
            used.add(f"{name}.glora_{path}.zeros")  # an absent path's zero buffer
        nodes[name] = GloraKernel(base=bases[name], support=support, configured=configured, has_bias=has_bias)
    return nodes, {}, used & set(tensors)


def to_config(config: dict) -> tuple[str, GloraConfig]:
    return "glora", GloraConfig(r=config.get("r", 8), config_A_B=config.get("config_A_B", "lora"),
                                config_C=config.get("config_C", "lora"), config_D_E=config.get("config_D_E", "constant"),
                                **targeting_from_peft(config))


# --- registration ---------------------------------------------------------------------------------

register_method(AdapterMethod(name="glora", config=GloraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              sees_biases=True, examples={"glora": lambda: GloraConfig(r=2)}))
register_peft_format(PeftFormat(peft_type="GLORA", write=write, read=read, to_config=to_config))
