"""Super-Tuning ("Supra-Tuning: Combining Outlier and Low-Rank Adaptation for Sparse and Efficient LLM
Fine-Tuning", 2026, arXiv 2607.09287; PEFT `SupertuningConfig`): a layer trains the entries of its weight
with the largest magnitudes ("Super"), optionally beside a LoRA ("Supra", when r is set).

    k = int(in * out * (1 - sparsity))   entries, chosen once by |W| (the smallest with select_top=False)
    delta [in, out] = the trained values at those entries  (+ lora_alpha / r * a @ b)
    y = x @ (base + sparse delta) + lora_alpha / r * dropout(x) @ a @ b

The positions are flat indices into the weight in torch's (out, in) row-major order: the entries torch's
`topk` of |W| chooses (ties at the boundary, which random or trained weights do not have, may choose
differently), kept in ascending order (PEFT keeps topk's order; a file holds its own order, and one
saved without positions has them chosen again in topk's order). Values start at zero and b at zero with `init_weights=True` (the base model); a is
Kaiming-uniform. False draws the values standard normal and b Kaiming-uniform.

PEFT format (`peft_type: SUPERTUNING`): `<module>.supertuning_values` (k,), `<module>.supertuning_indices`
(k,) int32, and with r `<module>.supertuning_lora_A.weight` (r, in) = a.T and
`<module>.supertuning_lora_B.weight` (out, r) = b.T; `sparsity`, `select_top`, `r`, `lora_alpha`,
`lora_dropout` and `save_precomputed_indices` in the config. A file saved without indices
(`save_precomputed_indices: false`) has them chosen again from the base weight, as PEFT does. PEFT
implements Super-Tuning for nn.Linear only: on GPT-2 (Conv1D layers) it trains and merges here, and
saving it for PEFT is refused.
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
from lowrax.core.checked import ConfigValueError, PositiveInt, Probability, owner_name
from lowrax.core.kernels import dense_kernel
from lowrax.core.node import FACTOR, LORA_A, LORA_B, dropped
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import (PREFIX, adapted_modules, adapter_tensor, check_shape, one_setting, refuse_conv1d,
                                torch_layout)


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SupertuningConfig(TargetConfig):
    """Super-Tuning's hyper-parameters, with PEFT's names and defaults."""

    sparsity: Probability = 0.99  # the share of each weight left frozen
    select_top: bool = True  # True: train the largest-magnitude entries; False: the smallest
    r: PositiveInt | None = None  # a LoRA of this rank beside the sparse entries ("Supra"); None: none
    lora_alpha: float | None = None  # its scale is lora_alpha / r; None: 2 r, as PEFT
    lora_dropout: Probability = 0.0  # training: dropout on the LoRA path's input
    init_weights: bool = True  # True: values and b zero (the base model); False: random

    def __post_init__(self):
        super().__post_init__()
        if self.r is None and self.lora_alpha is not None:
            raise ConfigValueError(owner_name(self), "lora_alpha", self.lora_alpha,
                                   "unset when r is unset (the LoRA it scales exists only with r)")

    @property
    def alpha(self) -> float:
        return float(2 * self.r if self.lora_alpha is None else self.lora_alpha)


def trained_count(d_in: int, d_out: int, sparsity: float) -> int:
    return int(d_in * d_out * (1 - sparsity))  # PEFT's arithmetic, float rounding included


def chosen_positions(w: np.ndarray, k: int, select_top: bool) -> np.ndarray:
    """(k,) int32 flat positions into the torch-layout weight w [out, in], by |w| (descending, or
    ascending for the smallest), as torch.topk orders them."""
    scores = np.abs(np.asarray(w, np.float32)).reshape(-1)
    order = np.argsort(-scores if select_top else scores, kind="stable")
    return order[:k].astype(np.int32)


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class SupertuningKernel(DeltaKernel):
    """base [in, out] frozen; values [k] trained at the frozen flat (out, in) positions `indices` [k];
    a [in, r] and b [r, out] trained, or None without the LoRA."""

    base: Any
    values: jnp.ndarray
    indices: jnp.ndarray  # int32, frozen: an array so files with any positions load
    a: jnp.ndarray | None  # None without the LoRA
    b: jnp.ndarray | None
    dropout_key: Any = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    sparsity: float = struct.field(pytree_node=False, default=0.99)  # how the positions were chosen (the
    select_top: bool = struct.field(pytree_node=False, default=True)  # config PEFT reads them with)
    peft_type = "SUPERTUNING"

    def field_labels(self) -> dict:
        return {"values": FACTOR, "a": LORA_A, "b": LORA_B}

    def field_axes(self) -> dict:
        return {"values": (None,), "indices": (None,), "a": ("in", "lora_rank"), "b": ("lora_rank", "out")}

    @property
    def rank(self) -> int:
        return 0 if self.a is None else int(self.a.shape[1])

    @property
    def folds_into_base(self) -> bool:
        return self.rank == 0 or self.dropout == 0.0 or self.dropout_key is None

    def sparse_delta(self) -> jnp.ndarray:
        d_in, d_out = self.base.shape
        flat = jnp.zeros((d_out * d_in,), jnp.float32).at[self.indices].add(self.values.astype(jnp.float32))
        return flat.reshape(d_out, d_in).T

    def lora_delta(self) -> jnp.ndarray:
        return self.scale * (self.a.astype(jnp.float32) @ self.b.astype(jnp.float32))

    def delta(self) -> jnp.ndarray:
        return self.sparse_delta() + self.lora_delta() if self.rank else self.sparse_delta()

    def delta_output(self, x: jnp.ndarray) -> jnp.ndarray:
        out = x @ self.sparse_delta().astype(x.dtype)
        if self.rank:
            low = dropped(x, self.dropout, self.dropout_key) @ self.a.astype(x.dtype) @ self.b.astype(x.dtype)
            out = out + self.scale * low
        return out


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: SupertuningConfig, key, adapter_dtype,
                model_type=None) -> tuple[dict, dict]:
    nodes, r = {}, cfg.r or 0
    for i, (name, base) in enumerate(bases.items()):
        d_in, d_out = base.shape
        k = trained_count(d_in, d_out, cfg.sparsity)
        if k < 1:
            raise LowraxError(f"Super-Tuning sparsity {cfg.sparsity} leaves no entry of {name} ({d_out} x {d_in}) "
                              "to train; lower the sparsity")
        k_v, k_a, k_b = jax.random.split(jax.random.fold_in(key, i), 3)
        indices = chosen_positions(np.asarray(dense_kernel(base), np.float32).T, k, cfg.select_top)
        values = (jnp.zeros((k,), adapter_dtype) if cfg.init_weights
                  else jax.random.normal(k_v, (k,), jnp.float32).astype(adapter_dtype))
        a = kaiming_uniform(k_a, (d_in, r), d_in, adapter_dtype) if r else None
        b = None if not r else (jnp.zeros((r, d_out), adapter_dtype) if cfg.init_weights
                                else kaiming_uniform(k_b, (r, d_out), r, adapter_dtype))
        nodes[name] = SupertuningKernel(base=base, values=values, indices=jnp.asarray(np.sort(indices)), a=a, b=b,
                                        scale=cfg.alpha / r if r else 1.0, dropout=cfg.lora_dropout,
                                        sparsity=cfg.sparsity, select_top=cfg.select_top)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, SupertuningKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "Super-Tuning")
    sparsity, select_top, r, scale, dropout = one_setting(
        ((n.sparsity, n.select_top, n.rank, n.scale, n.dropout) for n in nodes.values()), "Super-Tuning",
        "sparsity, select_top, r, lora_alpha and lora_dropout")
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.supertuning_values"] = np.asarray(node.values, np.float32)
        tensors[f"{PREFIX}{name}.supertuning_indices"] = np.asarray(node.indices, np.int32)
        if r:
            tensors[f"{PREFIX}{name}.supertuning_lora_A.weight"] = torch_layout(node.a)
            tensors[f"{PREFIX}{name}.supertuning_lora_B.weight"] = torch_layout(node.b)
    return tensors, {"sparsity": sparsity, "select_top": select_top, "r": r or None,
                     "lora_alpha": scale * r if r else None, "lora_dropout": dropout,
                     "save_precomputed_indices": True, "init_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    sparsity, select_top = float(config.get("sparsity", 0.99)), bool(config.get("select_top", True))
    r = int(config.get("r") or 0)
    alpha = float(config.get("lora_alpha") or 2 * r)
    nodes, used = {}, set()
    for name in adapted_modules(tensors, ".supertuning_values", bases, "Super-Tuning"):
        d_in, d_out = bases[name].shape
        k = trained_count(d_in, d_out, sparsity)
        values = adapter_tensor(tensors, name, "supertuning_values", (k,), "Super-Tuning")
        key = f"{name}.supertuning_indices"
        if key in tensors:
            check_shape(name, "supertuning_indices", tensors[key], (k,))
            indices = np.asarray(tensors[key]).astype(np.int64)
            if (indices < 0).any() or (indices >= d_in * d_out).any():
                raise CheckpointError(f"adapter tensor {PREFIX}{key} holds positions outside {name}'s "
                                      f"{d_out} x {d_in} weight")
            used.add(key)
        elif config.get("save_precomputed_indices", True) is False:
            indices = chosen_positions(np.asarray(dense_kernel(bases[name]), np.float32).T, k, select_top)
        else:
            raise CheckpointError(f"Super-Tuning adapter lacks {PREFIX}{key}")
        if r:
            a = adapter_tensor(tensors, name, "supertuning_lora_A.weight", (r, d_in), "Super-Tuning").T
            b = adapter_tensor(tensors, name, "supertuning_lora_B.weight", (d_out, r), "Super-Tuning").T
            used |= {f"{name}.supertuning_lora_A.weight", f"{name}.supertuning_lora_B.weight"}
            a, b = jnp.asarray(a, adapter_dtype), jnp.asarray(b, adapter_dtype)
        else:
            a = b = None
        nodes[name] = SupertuningKernel(base=bases[name], values=jnp.asarray(values, adapter_dtype),
                                        indices=jnp.asarray(indices, jnp.int32), a=a, b=b, scale=alpha / r if r else 1.0,
                                        dropout=float(config.get("lora_dropout") or 0.0), sparsity=sparsity,
                                        select_top=select_top)
        used.add(f"{name}.supertuning_values")
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, SupertuningConfig]:
    r = config.get("r")
    return "supertuning", SupertuningConfig(
        sparsity=float(config.get("sparsity", 0.99)), select_top=bool(config.get("select_top", True)),
        r=None if r is None else int(r), lora_alpha=None if r is None else config.get("lora_alpha"),
        lora_dropout=float(config.get("lora_dropout") or 0.0), **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="supertuning", config=SupertuningConfig, build=build_nodes,
                              default_roles=ATTENTION_QV,
                              examples={"supertuning": lambda: SupertuningConfig(sparsity=0.9),
                                        "supra": lambda: SupertuningConfig(sparsity=0.95, r=2)}))
register_peft_format(PeftFormat(peft_type="SUPERTUNING", write=write, read=read, to_config=to_config))
