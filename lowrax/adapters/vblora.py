"""VB-LoRA (Li et al. 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks"; PEFT
`VBLoRAConfig`): every layer's LoRA factors are assembled from one bank of `num_vectors` vectors of length
`vector_length`, shared by all layers and trained; each sub-vector of A and B is a softmax-weighted mix of
the `topk` bank vectors its trained logits rank highest.

    A [r, in]:  row i, chunk j = sum_k softmax(top-k logits_a[i, j]) * bank[their indices]
    B [out, r]: chunk j of column i from logits_b[j, i] the same way
    y = x @ base + dropout(x) @ A^T @ B^T

PEFT's init: the bank uniform in +-init_vector_bank_bound, the logits normal (init_logits_std), so
the model moves a little at init. The bank lives once at `params["vblora_vector_bank"]` (trained in
full) and is handed to the nodes inside the traced forward (`bind_shared`).

PEFT format (`peft_type: VBLORA`): `<module>.vblora_logits_A` (r, in / L, N), `<module>.vblora_logits_B`
(out / L, r, N) and `base_model.vblora_vector_bank` (N, L); files saved with `save_only_topk_weights`
hold `..._topk_indices` and `..._topk_weights` (all but the last weight) instead of the logits: they load
for inference (the other logits are -inf, as PEFT restores them) and cannot continue training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import ConfigValueError, PositiveFloat, PositiveInt, Probability, owner_name
from lowrax.core.linear import matmul
from lowrax.core.node import FACTOR, AdapterNode, FullyTrained, dropped, shared_entry, unwrapped
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, fan_in_fan_out, one_setting

SHARED = "vblora_vector_bank"  # the tree's top-level key for the bank
BANK_KEY = "base_model.vblora_vector_bank"  # PEFT's


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VBLoRAConfig(TargetConfig):
    """VB-LoRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 4  # rank of A [r, in] and B [out, r]
    num_vectors: PositiveInt = 256  # vectors in the shared bank
    vector_length: PositiveInt = 256  # their length (divides every targeted layer's widths)
    topk: PositiveInt = 2  # bank vectors mixed into each sub-vector
    vblora_dropout: Probability = 0.0  # training: dropout on the adapter path's input
    init_vector_bank_bound: PositiveFloat = 0.02  # the bank starts uniform in +-bound
    init_logits_std: PositiveFloat = 0.1  # the logits start normal with this standard deviation

    def __post_init__(self):
        super().__post_init__()
        if self.topk > self.num_vectors:
            raise ConfigValueError(owner_name(self), "topk", self.topk,
                                   f"at most num_vectors ({self.num_vectors})")


# --- node -----------------------------------------------------------------------------------------

def mixed(logits: jnp.ndarray, bank: jnp.ndarray, topk: int) -> jnp.ndarray:
    """[..., L]: each row of logits [..., N] mixes its top-k bank vectors by the softmax of their logits."""
    top, indices = jax.lax.top_k(logits.astype(jnp.float32), topk)
    weights = jax.nn.softmax(top, axis=-1)
    return jnp.einsum("...k,...kl->...l", weights, bank.astype(jnp.float32)[indices])


@struct.dataclass
class VBLoRAKernel(AdapterNode):
    """base [in, out] frozen; logits_a [r, in / L, N] and logits_b [out / L, r, N] trained; `bank` [N, L]
    is None as stored and bound to the shared bank by `bind_shared`."""

    base: Any
    logits_a: jnp.ndarray
    logits_b: jnp.ndarray
    dropout_key: Any = None
    bank: Any = None
    topk: int = struct.field(pytree_node=False, default=2)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "VBLORA"

    def bind_shared(self, params: dict) -> "VBLoRAKernel":
        bank = shared_entry(params, SHARED, "a VB-LoRA kernel needs the shared vector bank")
        return self.replace(bank=bank)  # `resolve` has unwrapped its FullyTrained

    def field_labels(self) -> dict:
        return {"logits_a": FACTOR, "logits_b": FACTOR}

    def field_axes(self) -> dict:
        return {"logits_a": (None, None, None), "logits_b": (None, None, None)}

    def factors(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(A [r, in], B [out, r]) in float32."""
        if self.bank is None:
            raise LowraxError("VB-LoRA kernel used without its vector bank; call the model with the whole tree")
        r = self.logits_a.shape[0]
        a = mixed(self.logits_a, self.bank, self.topk).reshape(r, -1)
        b = jnp.swapaxes(mixed(self.logits_b, self.bank, self.topk), 1, 2).reshape(-1, r)
        return a, b

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        a, b = (f.astype(x.dtype) for f in self.factors())
        return y + ((dropped(x, self.dropout, self.dropout_key) @ a.T) @ b.T).astype(y.dtype)

    def delta(self) -> jnp.ndarray:
        a, b = self.factors()
        return a.T @ b.T

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()


# --- build ----------------------------------------------------------------------------------------

def check_widths(name: str, d_in: int, d_out: int, length: int, error=LowraxError, widths_gcd: int | None = None) -> None:
    for side, width in (("input", d_in), ("output", d_out)):
        if width % length:
            hint = (f"; choose a divisor of {widths_gcd} (the greatest common divisor of the targeted layers' "
                    "widths)") if widths_gcd else ""
            raise error(f"VB-LoRA vector_length {length} must divide {name}'s {side} width {width}{hint}")


def build_nodes(bases: dict[str, Any], cfg: VBLoRAConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    """PEFT's draws (the same distributions, not torch's numbers)."""
    length, n = cfg.vector_length, cfg.num_vectors
    bound = cfg.init_vector_bank_bound
    bank = jax.random.uniform(jax.random.fold_in(key, 0), (n, length), jnp.float32, -bound, bound)
    nodes, widths_gcd = {}, math.gcd(*(d for base in bases.values() for d in base.shape))
    for i, (name, base) in enumerate(bases.items()):
        d_in, d_out = base.shape
        check_widths(name, d_in, d_out, length, widths_gcd=widths_gcd)
        k_a, k_b = jax.random.split(jax.random.fold_in(key, i + 1))
        logits_a = cfg.init_logits_std * jax.random.normal(k_a, (cfg.r, d_in // length, n), jnp.float32)
        logits_b = cfg.init_logits_std * jax.random.normal(k_b, (d_out // length, cfg.r, n), jnp.float32)
        nodes[name] = VBLoRAKernel(base=base, logits_a=logits_a.astype(adapter_dtype),
                                   logits_b=logits_b.astype(adapter_dtype), topk=cfg.topk, dropout=cfg.vblora_dropout)
    return nodes, {SHARED: FullyTrained(bank.astype(adapter_dtype))}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, VBLoRAKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    bank = params.get(SHARED)
    if bank is None:
        raise LowraxError(f"VB-LoRA params lack their vector bank at params[{SHARED!r}]")
    bank = np.asarray(unwrapped(bank), np.float32)
    r, topk, dropout = one_setting(((int(n.logits_a.shape[0]), n.topk, n.dropout) for n in nodes.values()),
                                   "VB-LoRA", "r, topk and vblora_dropout")
    tensors = {BANK_KEY: bank}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.vblora_logits_A"] = np.asarray(node.logits_a, np.float32)
        tensors[f"{PREFIX}{name}.vblora_logits_B"] = np.asarray(node.logits_b, np.float32)
    return tensors, {"r": r, "num_vectors": int(bank.shape[0]), "vector_length": int(bank.shape[1]), "topk": topk,
                     "vblora_dropout": dropout, "save_only_topk_weights": False, "bias": "none",
                     "fan_in_fan_out": fan_in_fan_out(model)}


def logits_from_topk(tensors: dict, key: str, shape: tuple[int, ...], topk: int, n: int) -> np.ndarray:
    """The logits PEFT restores from a save_only_topk_weights file: log of the top-k weights (the last is
    one minus the others), -inf elsewhere."""
    indices = np.asarray(adapter_tensor(tensors, *key.rsplit(".", 1), (*shape[:-1], topk), "VB-LoRA")).astype(np.int64)
    kept = np.asarray(adapter_tensor(tensors, *f"{key.removesuffix('_topk_indices')}_topk_weights".rsplit(".", 1),
                                     (*shape[:-1], topk - 1), "VB-LoRA"), np.float64)
    weights = np.concatenate([kept, 1.0 - kept.sum(-1, keepdims=True)], axis=-1)
    if (indices < 0).any() or (indices >= n).any():
        raise CheckpointError(f"adapter tensor {PREFIX}{key} indexes outside the {n}-vector bank")
    logits = np.full(shape, -np.inf, np.float32)
    with np.errstate(divide="ignore"):
        np.put_along_axis(logits, indices, np.log(weights).astype(np.float32), axis=-1)
    return logits


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"VB-LoRA adapter_config.json has bias {config.get('bias')!r}; lowrax reads bias 'none' "
                              "(PEFT's default) only")
    if BANK_KEY not in tensors:
        raise CheckpointError(f"VB-LoRA adapter lacks {BANK_KEY}")
    r, topk = int(config.get("r", 4)), int(config.get("topk", 2))
    n, length = int(config.get("num_vectors", 256)), int(config.get("vector_length", 256))
    if tuple(tensors[BANK_KEY].shape) != (n, length):
        raise CheckpointError(f"adapter tensor {BANK_KEY} has shape {tuple(tensors[BANK_KEY].shape)}, expected "
                              f"({n}, {length}) from num_vectors and vector_length")
    only_topk = bool(config.get("save_only_topk_weights", False))
    suffix = ".vblora_logits_A_topk_indices" if only_topk else ".vblora_logits_A"
    nodes, used = {}, {BANK_KEY}
    for name in adapted_modules(tensors, suffix, bases, "VB-LoRA"):
        d_in, d_out = bases[name].shape
        check_widths(name, d_in, d_out, length, CheckpointError)
        shapes = {"A": (r, d_in // length, n), "B": (d_out // length, r, n)}
        logits = {}
        for side, shape in shapes.items():
            key = f"{name}.vblora_logits_{side}"
            if only_topk:
                logits[side] = logits_from_topk(tensors, f"{key}_topk_indices", shape, topk, n)
                used |= {f"{key}_topk_indices", f"{key}_topk_weights"}
            else:
                logits[side] = adapter_tensor(tensors, name, f"vblora_logits_{side}", shape, "VB-LoRA")
                used.add(key)
        nodes[name] = VBLoRAKernel(base=bases[name], logits_a=jnp.asarray(logits["A"], adapter_dtype),
                                   logits_b=jnp.asarray(logits["B"], adapter_dtype), topk=topk,
                                   dropout=float(config.get("vblora_dropout") or 0.0))
    return nodes, {SHARED: FullyTrained(jnp.asarray(tensors[BANK_KEY], adapter_dtype))}, used


def to_config(config: dict) -> tuple[str, VBLoRAConfig]:
    if config.get("save_only_topk_weights"):
        raise LowraxError("this VB-LoRA adapter was saved with save_only_topk_weights: it keeps the top-k weights, "
                          "not the logits, so it loads for inference (lowrax.load_peft, lowrax generate) but cannot "
                          "continue training")
    return "vblora", VBLoRAConfig(r=config.get("r", 4), num_vectors=config.get("num_vectors", 256),
                                  vector_length=config.get("vector_length", 256), topk=config.get("topk", 2),
                                  vblora_dropout=float(config.get("vblora_dropout") or 0.0),
                                  **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="vblora", config=VBLoRAConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              shared_keys=(SHARED,), identity_at_init=False,
                              examples={"vblora": lambda: VBLoRAConfig(r=2, num_vectors=8, vector_length=8)}))
register_peft_format(PeftFormat(peft_type="VBLORA", write=write, read=read, to_config=to_config))
