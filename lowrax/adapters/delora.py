"""DeLoRA (Bini et al. 2025, "Decoupling Angles and Strength in Low-rank Adaptation"; PEFT `DeloraConfig`):
a low-rank delta whose rank-one parts are normalised, so its strength is one learned number per layer,
bounded however far the directions move.

    delta [in, out] = diag(w_norm) @ a @ diag(lambda / r / (|a_i| |b_i|)) @ b
    y = x @ base + ((dropout(x) * w_norm) @ a * lambda / r / (|a_i| |b_i|)) @ b

a [in, r], b [r, out]; |a_i| is the norm of a's i-th column, |b_i| of b's i-th row (each at least
1e-4), lambda a trained scalar (`delora_lambda`, 15) and w_norm [in] the frozen kernel's norms over its
outputs, taken at init and saved with the adapter. PEFT's init (`init_weights=True`): a Kaiming-uniform,
b zero (the base model); False draws b Kaiming-uniform too. `module_dropout` drops the adapter path's
input, as PEFT's layer does.

PEFT format (`peft_type: DELORA`), torch orientation: `<module>.delora_A` (r, in) = a.T,
`<module>.delora_B` (out, r) = b.T, `<module>.delora_lambda` (1,), `<module>.delora_w_norm` (in,);
`r`, `delora_lambda`, `rank_pattern`, `lambda_pattern` in the config. PEFT implements DeLoRA for
nn.Linear only: on GPT-2 (Conv1D layers) it trains and merges here, and saving it for PEFT is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.delta import DeltaKernel
from lowrax.adapters.init import kaiming_uniform
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, check_patterns, pattern_value, targeting_from_peft
from lowrax.core.checked import PositiveFloat, PositiveInt, Probability
from lowrax.core.kernels import dense_kernel
from lowrax.core.node import FACTOR, VECTOR, dropped
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, refuse_conv1d, torch_layout, value_and_pattern

NORM_FLOOR = 1e-4  # PEFT clamps the factors' norms here


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeloraConfig(TargetConfig):
    """DeLoRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 8  # rank of the delta
    delora_lambda: PositiveFloat = 15.0  # the initial strength (trained)
    module_dropout: Probability = 0.0  # training: dropout on the adapter path's input
    rank_pattern: dict = field(default_factory=dict)  # regex on module name -> its rank
    lambda_pattern: dict = field(default_factory=dict)  # regex on module name -> its initial lambda
    init_weights: bool = True  # True: b zero (the base model); False: b Kaiming-uniform

    def __post_init__(self):
        super().__post_init__()
        check_patterns(self, "rank_pattern", self.rank_pattern, PositiveInt)
        check_patterns(self, "lambda_pattern", self.lambda_pattern, PositiveFloat)


def floored_norm(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """max(|x|, NORM_FLOOR) along `axis`, as PEFT's clamp: below the floor the gradient is zero (a plain
    norm's gradient at a zero vector, b's rows at init, is NaN)."""
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis), NORM_FLOOR**2))


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class DeloraKernel(DeltaKernel):
    """base [in, out] frozen; a [in, r], b [r, out], strength [1] trained; w_norm [in] frozen."""

    base: Any
    a: jnp.ndarray
    b: jnp.ndarray
    strength: jnp.ndarray
    w_norm: jnp.ndarray
    dropout_key: Any = None
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "DELORA"

    def field_labels(self) -> dict:
        return {"a": FACTOR, "b": FACTOR, "strength": VECTOR}

    def field_axes(self) -> dict:
        return {"a": ("in", "lora_rank"), "b": ("lora_rank", "out"), "strength": (None,), "w_norm": ("in",)}

    def scaling(self) -> jnp.ndarray:
        """[r]: lambda / r / (|a_i| |b_i|), float32."""
        a, b = self.a.astype(jnp.float32), self.b.astype(jnp.float32)
        norms = floored_norm(a, axis=0) * floored_norm(b, axis=1)
        return self.strength.astype(jnp.float32) / self.a.shape[1] / norms

    def delta(self) -> jnp.ndarray:
        a = self.a.astype(jnp.float32) * self.w_norm.astype(jnp.float32)[:, None]
        return (a * self.scaling()) @ self.b.astype(jnp.float32)

    def delta_output(self, x: jnp.ndarray) -> jnp.ndarray:
        h = (dropped(x, self.dropout, self.dropout_key) * self.w_norm.astype(x.dtype)) @ self.a.astype(x.dtype)
        return (h * self.scaling().astype(x.dtype)) @ self.b.astype(x.dtype)


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: DeloraConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        d_in, d_out = base.shape
        r = int(pattern_value(name, cfg.rank_pattern, cfg.r))
        strength = float(pattern_value(name, cfg.lambda_pattern, cfg.delora_lambda))
        k_a, k_b = jax.random.split(jax.random.fold_in(key, i))
        b = jnp.zeros((r, d_out), adapter_dtype) if cfg.init_weights else kaiming_uniform(k_b, (r, d_out), r, adapter_dtype)
        w_norm = jnp.linalg.norm(dense_kernel(base).astype(jnp.float32), axis=1)
        nodes[name] = DeloraKernel(base=base, a=kaiming_uniform(k_a, (d_in, r), d_in, adapter_dtype), b=b,
                                   strength=jnp.full((1,), strength, adapter_dtype), w_norm=w_norm,
                                   dropout=cfg.module_dropout)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, DeloraKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "DeLoRA")
    ranks = {name: int(node.a.shape[1]) for name, node in nodes.items()}
    common, pattern = value_and_pattern(ranks)
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.delora_A"] = torch_layout(node.a)
        tensors[f"{PREFIX}{name}.delora_B"] = torch_layout(node.b)
        tensors[f"{PREFIX}{name}.delora_lambda"] = np.asarray(node.strength, np.float32)
        tensors[f"{PREFIX}{name}.delora_w_norm"] = np.asarray(node.w_norm, np.float32)
    # lambda is trained and saved per layer: the config's value only initialises a fresh adapter
    return tensors, {"r": common, "rank_pattern": pattern,
                     "delora_lambda": 15, "lambda_pattern": {},
                     "module_dropout": max(node.dropout for node in nodes.values()), "init_weights": True,
                     "bias": "none"}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    nodes, used = {}, set()
    for name in adapted_modules(tensors, ".delora_A", bases, "DeLoRA"):
        d_in, d_out = bases[name].shape
        r = int(pattern_value(name, config.get("rank_pattern"), config.get("r", 8)))
        arrays = {"a": adapter_tensor(tensors, name, "delora_A", (r, d_in), "DeLoRA").T,
                  "b": adapter_tensor(tensors, name, "delora_B", (d_out, r), "DeLoRA").T,
                  "strength": adapter_tensor(tensors, name, "delora_lambda", (1,), "DeLoRA"),
                  "w_norm": adapter_tensor(tensors, name, "delora_w_norm", (d_in,), "DeLoRA")}
        nodes[name] = DeloraKernel(base=bases[name], dropout=float(config.get("module_dropout") or 0.0),
                                   **{k: jnp.asarray(v, adapter_dtype if k != "w_norm" else jnp.float32)
                                      for k, v in arrays.items()})
        used |= {f"{name}.delora_{part}" for part in ("A", "B", "lambda", "w_norm")}
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, DeloraConfig]:
    return "delora", DeloraConfig(r=int(config.get("r", 8)), delora_lambda=float(config.get("delora_lambda", 15)),
                                  module_dropout=float(config.get("module_dropout") or 0.0),
                                  rank_pattern=dict(config.get("rank_pattern") or {}),
                                  lambda_pattern=dict(config.get("lambda_pattern") or {}), **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="delora", config=DeloraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"delora": lambda: DeloraConfig(r=2)}))
register_peft_format(PeftFormat(peft_type="DELORA", write=write, read=read, to_config=to_config))
