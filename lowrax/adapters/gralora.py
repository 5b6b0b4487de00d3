"""GraLoRA (Jung et al. 2025, "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient
Fine-Tuning"; PEFT `GraloraConfig`): the weight is cut into k x k blocks and each block gets its own
rank-(r / k) product, so the delta's rank can reach r * k for LoRA's parameter count; `hybrid_r` adds a
plain LoRA of that rank beside it.

    block (n, j) of delta [in, out] = a[n][:, chunk j] @ b[j][chunk n, :]      a [k, in / k, r], b [k, r, out / k]
    delta = (blocks + a_general @ b_general) * alpha / (r + hybrid_r)
    y = x @ base + dropout(x) @ delta       (applied block-wise, never forming delta)

"chunk j" is the j-th of the k slices of width r / k of the rank axis. PEFT's init (`init_weights=True`):
a Kaiming-uniform, b zero (the base model); False draws b Kaiming-uniform too.

PEFT format (`peft_type: GRALORA`): `<module>.gralora_A` (k, in / k, r) and `<module>.gralora_B`
(k, r, out / k) as lowrax holds them; with hybrid_r > 0 `<module>.gralora_A_general.weight` (hybrid_r, in)
and `<module>.gralora_B_general.weight` (out, hybrid_r); `r`, `alpha`, `gralora_k`, `hybrid_r` in the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.delta import DeltaKernel
from lowrax.adapters.init import kaiming_uniform
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import ConfigValueError, Count, PositiveFloat, PositiveInt, Probability, owner_name
from lowrax.core.node import FACTOR, dropped
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, fan_in_fan_out, one_setting, torch_layout


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GraloraConfig(TargetConfig):
    """GraLoRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 32  # rank per block row (a multiple of gralora_k)
    alpha: PositiveFloat = 64.0  # delta is scaled by alpha / (r + hybrid_r)
    gralora_k: PositiveInt = 2  # blocks per side (divides every targeted width and r)
    hybrid_r: Count = 0  # rank of a plain LoRA added beside the blocks
    gralora_dropout: Probability = 0.0  # training: dropout on the adapter path's input
    init_weights: bool = True  # True: b zero (the base model); False: b Kaiming-uniform

    def __post_init__(self):
        super().__post_init__()
        if self.r % self.gralora_k:
            raise ConfigValueError(owner_name(self), "r", self.r, f"a multiple of gralora_k ({self.gralora_k})")


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class GraloraKernel(DeltaKernel):
    """base [in, out] frozen; a [k, in / k, r], b [k, r, out / k] (and a_general [in, h], b_general [h, out]) trained."""

    base: Any
    a: jnp.ndarray
    b: jnp.ndarray
    a_general: jnp.ndarray | None = None
    b_general: jnp.ndarray | None = None
    dropout_key: Any = None
    alpha: float = struct.field(pytree_node=False, default=64.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "GRALORA"

    def field_labels(self) -> dict:
        return {"a": FACTOR, "b": FACTOR, "a_general": FACTOR, "b_general": FACTOR}

    def field_axes(self) -> dict:
        return {"a": (None, None, "lora_rank"), "b": (None, "lora_rank", None), "a_general": ("in", None),
                "b_general": (None, "out")}

    @property
    def scale(self) -> float:
        hybrid = 0 if self.a_general is None else self.a_general.shape[1]
        return self.alpha / (self.a.shape[2] + hybrid)

    def _blocks(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """a as [n, i, j, s] and b as [j, n, s, o]: the rank axis split into k chunks of r / k."""
        k, sub_in, r = self.a.shape
        sub_out, s = self.b.shape[2], r // k
        return (self.a.astype(jnp.float32).reshape(k, sub_in, k, s),
                self.b.astype(jnp.float32).reshape(k, k, s, sub_out))

    def delta(self) -> jnp.ndarray:
        a, b = self._blocks()
        k, sub_in, _, _ = a.shape
        delta = jnp.einsum("nijs,jnso->nijo", a, b).reshape(k * sub_in, -1)
        if self.a_general is not None:
            delta = delta + self.a_general.astype(jnp.float32) @ self.b_general.astype(jnp.float32)
        return delta * self.scale

    def delta_output(self, x: jnp.ndarray) -> jnp.ndarray:
        x = dropped(x, self.dropout, self.dropout_key)
        a, b = (part.astype(x.dtype) for part in self._blocks())
        k, sub_in = a.shape[:2]
        h = jnp.einsum("...ni,nijs->...njs", x.reshape(*x.shape[:-1], k, sub_in), a)
        y = jnp.einsum("...njs,jnso->...jo", h, b).reshape(*x.shape[:-1], -1)
        if self.a_general is not None:
            y = y + (x @ self.a_general.astype(x.dtype)) @ self.b_general.astype(x.dtype)
        return y * self.scale


# --- build ----------------------------------------------------------------------------------------

def check_widths(name: str, d_in: int, d_out: int, k: int, error=LowraxError) -> None:
    if d_in % k or d_out % k:
        raise error(f"GraLoRA gralora_k={k} must divide {name}'s widths {d_in} (in) and {d_out} (out)")


def build_nodes(bases: dict[str, Any], cfg: GraloraConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    k, r, h, nodes = cfg.gralora_k, cfg.r, cfg.hybrid_r, {}
    for i, (name, base) in enumerate(bases.items()):
        d_in, d_out = base.shape
        check_widths(name, d_in, d_out, k)
        keys = jax.random.split(jax.random.fold_in(key, i), 4)

        def second(key, shape, fan_in):  # b: zero for the base model at init, else Kaiming-uniform
            return jnp.zeros(shape, adapter_dtype) if cfg.init_weights else kaiming_uniform(key, shape, fan_in, adapter_dtype)

        # PEFT draws each block's torch A (r, in / k) with fan-in in / k and its B (out / k, r) with fan-in r
        general = {}
        if h:
            general = {"a_general": kaiming_uniform(keys[2], (d_in, h), d_in, adapter_dtype),
                       "b_general": second(keys[3], (h, d_out), h)}
        nodes[name] = GraloraKernel(base=base, a=kaiming_uniform(keys[0], (k, d_in // k, r), d_in // k, adapter_dtype),
                                    b=second(keys[1], (k, r, d_out // k), r), alpha=cfg.alpha,
                                    dropout=cfg.gralora_dropout, **general)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, GraloraKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    k, r, h, alpha = one_setting(((int(n.a.shape[0]), int(n.a.shape[2]), 0 if n.a_general is None else int(n.a_general.shape[1]),
                                   n.alpha) for n in nodes.values()), "GraLoRA", "gralora_k, r, hybrid_r and alpha")
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.gralora_A"] = np.asarray(node.a, np.float32)
        tensors[f"{PREFIX}{name}.gralora_B"] = np.asarray(node.b, np.float32)
        if h:
            tensors[f"{PREFIX}{name}.gralora_A_general.weight"] = torch_layout(node.a_general)
            tensors[f"{PREFIX}{name}.gralora_B_general.weight"] = torch_layout(node.b_general)
    return tensors, {"r": r, "alpha": alpha, "gralora_k": k, "hybrid_r": h, "init_weights": True,
                     "gralora_dropout": max(n.dropout for n in nodes.values()), "fan_in_fan_out": fan_in_fan_out(model),
                     "bias": "none"}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    k, r, h = int(config.get("gralora_k", 2)), int(config.get("r", 32)), int(config.get("hybrid_r") or 0)
    if r % k:
        raise CheckpointError(f"GraLoRA adapter_config.json has r={r}, not a multiple of gralora_k={k}")
    nodes, used = {}, set()
    as_array = lambda v: jnp.asarray(v, adapter_dtype)  # noqa: E731
    for name in adapted_modules(tensors, ".gralora_A", bases, "GraLoRA"):
        d_in, d_out = bases[name].shape
        check_widths(name, d_in, d_out, k, error=CheckpointError)
        arrays = {"a": adapter_tensor(tensors, name, "gralora_A", (k, d_in // k, r), "GraLoRA"),
                  "b": adapter_tensor(tensors, name, "gralora_B", (k, r, d_out // k), "GraLoRA")}
        used |= {f"{name}.gralora_A", f"{name}.gralora_B"}
        if h:
            arrays["a_general"] = adapter_tensor(tensors, name, "gralora_A_general.weight", (h, d_in), "GraLoRA").T
            arrays["b_general"] = adapter_tensor(tensors, name, "gralora_B_general.weight", (d_out, h), "GraLoRA").T
            used |= {f"{name}.gralora_A_general.weight", f"{name}.gralora_B_general.weight"}
        nodes[name] = GraloraKernel(base=bases[name], alpha=float(config.get("alpha", 64)),
                                    dropout=float(config.get("gralora_dropout") or 0.0),
                                    **{key: as_array(v) for key, v in arrays.items()})
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, GraloraConfig]:
    return "gralora", GraloraConfig(r=int(config.get("r", 32)), alpha=float(config.get("alpha", 64)),
                                    gralora_k=int(config.get("gralora_k", 2)), hybrid_r=int(config.get("hybrid_r") or 0),
                                    gralora_dropout=float(config.get("gralora_dropout") or 0.0),
                                    **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="gralora", config=GraloraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"gralora": lambda: GraloraConfig(r=4, alpha=8.0, hybrid_r=2)}))
register_peft_format(PeftFormat(peft_type="GRALORA", write=write, read=read, to_config=to_config))
