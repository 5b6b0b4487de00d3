"""MiSS (Kang et al. 2025, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing";
PEFT `MissConfig`): one small trained block, shared by every shard of the weight.

    default:  delta [in, out] = D repeated down the rows (row i is D[i mod r])      D [r, out]
              y = x @ base + (sum of dropout(x)'s r-wide shards) @ D
    "mini":   the same with D [r, mini_r] repeated across the columns too
    "bat":    each r x r block (a, c) of the torch weight W [out, in] becomes W_ac @ B_a + B_a,
              B [out / r, r, r]: the delta depends on the frozen weight (no dropout)

PEFT's init: D zero (`init_weights=True`, and in "bat" / "mini"), so the model starts as the base;
`False` draws D Kaiming-uniform. Merging adds the delta; "bat" unmerges with the base it is given.

PEFT format (`peft_type: MISS`): `<module>.miss_block` shaped (r, out), (out / r, r, r) for "bat" or
(r, mini_r) for "mini"; `r`, `mini_r`, `miss_dropout` and the mode (`init_weights`) in the config. PEFT
implements MiSS for nn.Linear only: on GPT-2 (Conv1D layers) it trains and merges here, and saving it for
PEFT is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.adapters.delta import DeltaKernel
from lowrax.adapters.init import kaiming_uniform
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import PositiveInt, Probability
from lowrax.core.kernels import dense_kernel
from lowrax.core.node import FACTOR, dropped
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, one_setting, refuse_conv1d

SUFFIX = ".miss_block"
MODES = ("default", "bat", "mini")


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MissConfig(TargetConfig):
    """MiSS's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 64  # the shard width (at most a layer's input width)
    miss_dropout: Probability = 0.0  # training: dropout on the adapter path's input (not in "bat")
    mini_r: PositiveInt = 1  # "mini": D's column count (divides every output width)
    # True: D zero (the base model); False: D Kaiming-uniform; "bat" / "mini": those forms, zero
    init_weights: bool | Literal["bat", "mini"] = True


def mode_of(init_weights) -> str:
    return init_weights if init_weights in ("bat", "mini") else "default"


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class MissKernel(DeltaKernel):
    """base [in, out] frozen; block trained: D [r, out], B [out / r, r, r] ("bat") or D [r, mini_r] ("mini")."""

    base: Any
    block: jnp.ndarray
    dropout_key: Any = None
    mode: str = struct.field(pytree_node=False, default="default")
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "MISS"

    def field_labels(self) -> dict:
        return {"block": FACTOR}

    def field_axes(self) -> dict:
        return {"block": (None,) * self.block.ndim}

    @property
    def rank(self) -> int:
        return int(self.block.shape[-1] if self.mode == "bat" else self.block.shape[0])

    def shared_block(self) -> jnp.ndarray:
        """D [r, out] (default and "mini"), float32."""
        d = self.block.astype(jnp.float32)
        return jnp.tile(d, (1, self.base.shape[1] // d.shape[1])) if self.mode == "mini" else d

    def delta_for(self, w: jnp.ndarray) -> jnp.ndarray:
        """The delta [in, out] over the dense float32 base w."""
        d_in, d_out = w.shape
        if self.mode != "bat":
            return self.shared_block()[jnp.arange(d_in) % self.rank]
        r, b = self.rank, self.block.astype(jnp.float32)
        blocks = w.T.reshape(d_out // r, r, d_in // r, r)  # torch's weight as blocks [a, p, c, s]
        delta_t = jnp.einsum("apcs,asq->apcq", blocks, b) + b[:, :, None, :]
        return delta_t.reshape(d_out, d_in).T

    @property
    def folds_into_base(self) -> bool:
        return self.mode == "bat"

    def delta(self) -> jnp.ndarray:
        return self.delta_for(dense_kernel(self.base).astype(jnp.float32))

    def delta_output(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.mode == "bat":
            return x @ self.delta().astype(x.dtype)
        x = dropped(x, self.dropout, self.dropout_key)
        r, width = self.rank, x.shape[-1]
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -width % r)])
        shards = x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(axis=-2)
        return shards @ self.shared_block().astype(x.dtype)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta_for(w)

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta_for(w)


# --- build ----------------------------------------------------------------------------------------

def block_shape(name: str, d_in: int, d_out: int, r: int, mode: str, mini_r: int, error=LowraxError) -> tuple:
    if r > d_in:
        raise error(f"MiSS r={r} exceeds {name}'s input width {d_in}; lower r")
    if mode == "bat":
        if d_in % r or d_out % r:
            raise error(f"MiSS 'bat' needs r={r} to divide {name}'s widths {d_in} (in) and {d_out} (out)")
        return (d_out // r, r, r)
    if mode == "mini":
        if d_out % mini_r:
            raise error(f"MiSS 'mini' needs mini_r={mini_r} to divide {name}'s output width {d_out}")
        return (r, mini_r)
    return (r, d_out)


def build_nodes(bases: dict[str, Any], cfg: MissConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    mode, nodes = mode_of(cfg.init_weights), {}
    for i, (name, base) in enumerate(bases.items()):
        shape = block_shape(name, *base.shape, cfg.r, mode, cfg.mini_r)
        block = (kaiming_uniform(jax.random.fold_in(key, i), shape, shape[-1], adapter_dtype) if cfg.init_weights is False
                 else jnp.zeros(shape, adapter_dtype))
        nodes[name] = MissKernel(base=base, block=block, mode=mode, dropout=cfg.miss_dropout)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, MissKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "MiSS")
    mode, r, mini_r = one_setting(((n.mode, n.rank, int(n.block.shape[1]) if n.mode == "mini" else 1)
                                   for n in nodes.values()), "MiSS", "mode, r and mini_r")
    tensors = {f"{PREFIX}{name}{SUFFIX}": jax.device_get(node.block.astype(jnp.float32)) for name, node in nodes.items()}
    return tensors, {"r": r, "mini_r": mini_r, "init_weights": True if mode == "default" else mode,
                     "miss_dropout": max(n.dropout for n in nodes.values()), "bias": "none"}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    mode, r, mini_r = mode_of(config.get("init_weights", True)), int(config.get("r", 64)), int(config.get("mini_r", 1))
    nodes = {}
    for name in adapted_modules(tensors, SUFFIX, bases, "MiSS"):
        shape = block_shape(name, *bases[name].shape, r, mode, mini_r, error=CheckpointError)
        block = adapter_tensor(tensors, name, SUFFIX[1:], shape, "MiSS")
        nodes[name] = MissKernel(base=bases[name], block=jnp.asarray(block, adapter_dtype), mode=mode,
                                 dropout=float(config.get("miss_dropout") or 0.0))
    return nodes, {}, {f"{n}{SUFFIX}" for n in nodes}


def to_config(config: dict) -> tuple[str, MissConfig]:
    mode = mode_of(config.get("init_weights", True))
    return "miss", MissConfig(r=int(config.get("r", 64)), mini_r=int(config.get("mini_r", 1)),
                              miss_dropout=float(config.get("miss_dropout") or 0.0),
                              init_weights=True if mode == "default" else mode, **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="miss", config=MissConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"miss": lambda: MissConfig(r=4), "miss_bat": lambda: MissConfig(r=4, init_weights="bat")}))
register_peft_format(PeftFormat(peft_type="MISS", write=write, read=read, to_config=to_config))
