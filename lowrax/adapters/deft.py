"""DeFT (Kumar et al. 2025, "DEFT: Decompositional Efficient Fine-Tuning for Text-to-Image Models"; PEFT
`DeftConfig`): a rank-r subspace of each layer's output is projected out of the frozen weight and a
trained injection put in its place.

In torch's (out, in) terms, with P [out, r] and R [r, in] trained:

    W' = (I - Q right^T) W + s Q R          s = alpha / r (1 without alpha)
    relu:  Q = P,        right = relu(P)     (a non-orthogonal projector, the default)
    qr:    Q = qr(P).Q,  right = Q           (an orthogonal projector)
    para:  no R (PaRa: the subspace is only removed)

so with y = x @ base (lowrax's [in, out] kernel): out = y - (y @ right) @ Q^T + s (dropout(x) @ R^T) @ Q^T.
PEFT's init (`init_weights=True`): P ~ N(0, 0.02) and R = right^T W / s, so the model starts as the base;
False draws R ~ N(0, 0.02 init_scale). Merging adds (s R - right^T W)^T Q^T to the kernel; unmerging
removes what the node's own base gives. The QR is LAPACK's, as torch's is, so Q's column signs agree.

PEFT format (`peft_type: DEFT`): `<module>.deft_P` (out, r) and `<module>.deft_R` (r, in) (absent with
para), the same for Linear and GPT-2's Conv1D; `r` (capped at each layer's output width), `alpha`,
`decomposition_method`, `init_scale`, `para`, `deft_dropout` and `fan_in_fan_out` in the config.
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
from lowrax.core.checked import PositiveFloat, PositiveInt, Probability
from lowrax.core.kernels import dense_kernel
from lowrax.core.linear import matmul
from lowrax.core.node import FACTOR, AdapterNode, dropped
from lowrax.errors import CheckpointError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, fan_in_fan_out, one_setting, torch_layout


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeftConfig(TargetConfig):
    """DeFT's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 8  # rank of the projected-out subspace (capped at each layer's output width)
    alpha: PositiveInt | None = None  # the injection's scale is alpha / r; None: 1
    decomposition_method: Literal["relu", "qr"] = "relu"  # how the projector is made from P
    init_scale: PositiveFloat = 1.0  # init_weights=False: R's standard deviation is 0.02 init_scale
    para: bool = False  # PaRa: remove the subspace only, no injection R
    deft_dropout: Probability = 0.0  # training: dropout on the injection's input
    init_weights: bool = True  # True: R makes the model start as the base; False: random R


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class DeftKernel(AdapterNode):
    """base [in, out] frozen; p [out, r] and rt [in, r] (R^T; None with para) trained."""

    base: Any
    p: jnp.ndarray
    rt: jnp.ndarray | None
    dropout_key: Any = None
    method: str = struct.field(pytree_node=False, default="relu")
    alpha: int | None = struct.field(pytree_node=False, default=None)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    init_scale: float = struct.field(pytree_node=False, default=1.0)
    peft_type = "DEFT"

    def field_labels(self) -> dict:
        return {"p": FACTOR, "rt": FACTOR}

    def field_axes(self) -> dict:
        return {"p": ("out", "lora_rank"), "rt": ("in", "lora_rank")}

    @property
    def rank(self) -> int:
        return int(self.p.shape[1])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha else 1.0

    def projector(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(q, right), float32 [out, r]: the projector is q @ right^T."""
        p = self.p.astype(jnp.float32)
        if self.method == "qr":
            q, _ = jnp.linalg.qr(p)  # LAPACK's (torch's) signs; one call per layer compiles in a blink
            return q, q
        return p, jax.nn.relu(p)

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        q, right = (m.astype(y.dtype) for m in self.projector())
        inner = -(y @ right)
        if self.rt is not None:
            inner = inner + self.scale * (dropped(x, self.dropout, self.dropout_key) @ self.rt.astype(x.dtype))
        return y + inner @ q.T

    def delta_of(self, w: jnp.ndarray) -> jnp.ndarray:
        """The merged kernel's change [in, out], given the dense float32 base w."""
        q, right = self.projector()
        inner = -(w @ right)
        if self.rt is not None:
            inner = inner + self.scale * self.rt.astype(jnp.float32)
        return inner @ q.T

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta_of(w)

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta_of(w)


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: DeftConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    """PEFT's `reset_deft_parameters` draws (the same distributions, not torch's numbers)."""
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        d_in, d_out = base.shape
        r = min(cfg.r, d_out)
        k_p, k_r = jax.random.split(jax.random.fold_in(key, i))
        node = DeftKernel(base=base, p=(0.02 * jax.random.normal(k_p, (d_out, r), jnp.float32)).astype(adapter_dtype),
                          rt=None, method=cfg.decomposition_method, alpha=cfg.alpha, dropout=cfg.deft_dropout,
                          init_scale=cfg.init_scale)
        if not cfg.para:
            if cfg.init_weights:  # R = right^T W / s: the injection cancels the removal
                _, right = node.projector()
                rt = dense_kernel(base).astype(jnp.float32) @ right / node.scale
            else:
                rt = 0.02 * cfg.init_scale * jax.random.normal(k_r, (d_in, r), jnp.float32)
            node = node.replace(rt=rt.astype(adapter_dtype))
        nodes[name] = node
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, DeftKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    method, alpha, para, dropout, init_scale = one_setting(
        ((n.method, n.alpha, n.rt is None, n.dropout, n.init_scale) for n in nodes.values()), "DeFT",
        "decomposition_method, alpha, para, deft_dropout and init_scale")
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.deft_P"] = np.asarray(node.p, np.float32)  # (out, r), as lowrax holds it
        if node.rt is not None:
            tensors[f"{PREFIX}{name}.deft_R"] = torch_layout(node.rt)  # (r, in)
    return tensors, {"r": max(n.rank for n in nodes.values()), "alpha": alpha, "decomposition_method": method,
                     "init_scale": init_scale, "para": para, "deft_dropout": dropout, "bias": "none",
                     "fan_in_fan_out": fan_in_fan_out(model), "init_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"DeFT adapter_config.json has bias {config.get('bias')!r}; lowrax reads bias 'none' "
                              "(PEFT's default) only")
    method, para = config.get("decomposition_method", "relu"), bool(config.get("para", False))
    if method not in ("relu", "qr"):
        raise CheckpointError(f"DeFT adapter_config.json has decomposition_method {method!r}; expected relu or qr")
    nodes, used = {}, set()
    for name in adapted_modules(tensors, ".deft_P", bases, "DeFT"):
        d_in, d_out = bases[name].shape
        r = min(int(config.get("r", 8)), d_out)
        p = adapter_tensor(tensors, name, "deft_P", (d_out, r), "DeFT")
        rt = None if para else jnp.asarray(adapter_tensor(tensors, name, "deft_R", (r, d_in), "DeFT").T, adapter_dtype)
        nodes[name] = DeftKernel(base=bases[name], p=jnp.asarray(p, adapter_dtype), rt=rt, method=method,
                                 alpha=config.get("alpha"), dropout=float(config.get("deft_dropout") or 0.0),
                                 init_scale=float(config.get("init_scale", 1.0)))
        used |= {f"{name}.deft_P"} | (set() if para else {f"{name}.deft_R"})
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, DeftConfig]:
    return "deft", DeftConfig(r=config.get("r", 8), alpha=config.get("alpha"),
                              decomposition_method=config.get("decomposition_method", "relu"),
                              init_scale=config.get("init_scale", 1.0), para=bool(config.get("para", False)),
                              deft_dropout=float(config.get("deft_dropout") or 0.0), **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

# The examples start away from the base (init_weights=False): at PEFT's init the relu form's negative P
# entries have a zero gradient, which Adam turns into rounding noise scaled to the learning rate, so a
# sharded step could not equal one device's. tests/test_catalogue_methods.py checks the init is the base.
register_method(AdapterMethod(name="deft", config=DeftConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              identity_at_init=False,
                              examples={"deft": lambda: DeftConfig(r=2, init_weights=False),
                                        "deft_qr": lambda: DeftConfig(r=2, alpha=4, decomposition_method="qr",
                                                                      init_weights=False)}))
register_peft_format(PeftFormat(peft_type="DEFT", write=write, read=read, to_config=to_config))
