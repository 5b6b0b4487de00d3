"""FRoD (PEFT `FrodConfig`; AAAI 2026): each layer's weight rewritten in a basis shared by all layers
of its kind, where training moves a diagonal scale and a sparse off-diagonal part.

Modules are sorted into categories by their name's last components (`self_attn_q_proj`, `mlp_down_proj`,
BERT's `attention_output`, ...). For each category one basis V [in, in] is solved from the weights of all
its layers jointly (a QR of the stacked weights, a ridge-regularised average of the inverses of each
layer's block, an eigendecomposition; an SVD when there are fewer rows than columns). Each layer then
writes its (out, in) weight W = U diag(lambda) V^T, solving W^T = V B^T in float64, lambda = the column
norms of B and U = B / lambda. Trained: lambda [in] and the values of a fixed random sparse S [in, in]
(a `sparse_rate` share of the off-diagonal entries, one pattern per category):

    y = ((x V) (diag(lambda) + S^T)) U^T    (+ the bias)    i.e. W' = U (diag(lambda) + S) V^T

so the model is the base at init (S = 0). With dropout, training adds the dropped input's change on
top of the exact base output. U is the layer's own frozen [out, in] array (as large as W: PEFT keeps it
too), computed again from the base and V when an adapter is loaded, as PEFT does.

PEFT format (`peft_type: FROD`, `save_projection: true`): `base_model.frod_V.<category>` (in, in),
`base_model.frod_s_indices.<category>` (2, nnz), `base_model.frod_s_size.<category>` (2,),
`<module>.frod_lambda_l` (in,) and `<module>.frod_lambda_s_values` (nnz,). The sparse pattern of a new
adapter is drawn by lowrax's generator (a file carries its own). Files without the projections are
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import Count, PositiveFloat, Probability, Share
from lowrax.core.kernels import dense_kernel
from lowrax.core.linear import matmul
from lowrax.core.node import FROZEN, VECTOR, AdapterNode, dropped, shared_entry
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, fan_in_fan_out, one_setting

SHARED = "frod_shared"  # {category: {"v": [in, in], "rows": [nnz], "cols": [nnz]}}, frozen


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrodConfig(TargetConfig):
    """FRoD's hyper-parameters, with PEFT's names and defaults."""

    sparse_rate: Share = 0.01  # the share of off-diagonal entries of S that train
    regularization_alpha: PositiveFloat = 1e-3  # the ridge term in the shared basis's inverses
    projection_prng_key: Count = 0  # seed of the sparse pattern
    frod_dropout: Probability = 0.0  # training: dropout on the adapter path's input
    init_weights: bool = True  # False: lambda and S start perturbed (a non-zero adapter, for tests)


def category_of(name: str) -> str:
    """PEFT's `_category_from_key`: the module's role from its last name components."""
    parts = name.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def layer_index_of(name: str, fallback: int) -> int:
    """PEFT's `_layer_index_from_key`: the number after `layers`, else the first number, else `fallback`."""
    parts = name.split(".")
    if "layers" in parts:
        index = parts.index("layers") + 1
        if index < len(parts) and parts[index].isdigit():
            return int(parts[index])
    return next((int(p) for p in parts if p.isdigit()), fallback)


def shared_basis(weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """PEFT's `_projection_from_weights`: V [in, in] from the category's (out, in) weights, float32."""
    stacked = np.concatenate(weights, axis=0).astype(np.float32)
    if stacked.shape[0] < stacked.shape[1]:
        return np.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = np.linalg.qr(stacked)
    dim = r.shape[1]
    t_pi = np.zeros((dim, dim), np.float32)
    start = 0
    for w in weights:
        block = q[start:start + w.shape[0]]
        start += w.shape[0]
        t_pi += np.linalg.inv(block.T @ block + alpha * np.eye(dim, dtype=np.float32))
    t_pi /= len(weights)
    return (r.T @ np.linalg.eigh(t_pi)[1]).astype(np.float32)


def rotation_of(w: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U [out, in], lambda [in]) with W = U diag(lambda) V^T, solved in float64 as PEFT does."""
    w64, v64 = w.astype(np.float64), v.astype(np.float64)
    try:
        b = np.linalg.solve(v64, w64.T).T
    except np.linalg.LinAlgError:
        b = w64 @ np.linalg.pinv(v64, rcond=1e-6).T
    scale = np.linalg.norm(b, axis=0)
    u = np.zeros_like(b)
    nonzero = scale > 1e-12
    u[:, nonzero] = b[:, nonzero] / scale[nonzero]
    return u.astype(np.float32), scale.astype(np.float32)


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class FrodKernel(AdapterNode):
    """base [in, out] and u [out, in] frozen; lambda_l [in] and s_values [nnz] trained; `v` [in, in] and the
    pattern (`rows`, `cols`) are bound from the category's shared arrays by `bind_shared`."""

    base: Any
    u: jnp.ndarray
    lambda_l: jnp.ndarray
    s_values: jnp.ndarray
    dropout_key: Any = None
    v: Any = None
    rows: Any = None
    cols: Any = None
    category: str = struct.field(pytree_node=False, default="")
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "FROD"

    def bind_shared(self, params: dict) -> "FrodKernel":
        shared = shared_entry(params, SHARED, "a FRoD kernel needs the shared bases")[self.category]
        return self.replace(v=shared["v"], rows=shared["rows"], cols=shared["cols"])

    def field_labels(self) -> dict:
        return {"u": FROZEN, "lambda_l": VECTOR, "s_values": VECTOR}

    def field_axes(self) -> dict:
        return {"u": ("out", None), "lambda_l": (None,), "s_values": (None,)}

    def _rotated(self, x: jnp.ndarray) -> jnp.ndarray:
        """x W'^T = ((x V)(diag(lambda) + S^T)) U^T."""
        if self.v is None:
            raise LowraxError("FRoD kernel used without its shared bases; call the model with the whole tree")
        z = jnp.matmul(x, self.v.astype(x.dtype))
        mixed = z * self.lambda_l.astype(x.dtype)
        mixed = mixed.at[:, self.rows].add(z[:, self.cols] * self.s_values.astype(x.dtype))
        return jnp.matmul(mixed, self.u.T.astype(x.dtype))

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.dropout_key is None or self.dropout <= 0.0:
            return self._rotated(x)
        x_dropped = dropped(x, self.dropout, self.dropout_key)  # PEFT: base(x) + (W'(drop x) - W(drop x))
        return matmul(x, self.base) + self._rotated(x_dropped) - matmul(x_dropped, self.base)

    def weight(self) -> jnp.ndarray:
        """W' in lowrax's [in, out] layout, float32."""
        n = self.lambda_l.shape[0]
        s = jnp.zeros((n, n), jnp.float32).at[self.rows, self.cols].add(self.s_values.astype(jnp.float32))
        core = jnp.diag(self.lambda_l.astype(jnp.float32)) + s
        return (self.u.astype(jnp.float32) @ core @ self.v.astype(jnp.float32).T).T

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return self.weight()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return w  # the node keeps the base it was built on (PEFT restores its saved copy)


# --- build ----------------------------------------------------------------------------------------

def _categories(names: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({category: the modules whose weights make its basis, by layer index}, {category: every module of
    it}) as PEFT builds them: of two modules with the same layer index and category (T5's encoder and
    decoder blocks) only the later one's weight enters the basis, and both are adapted with it."""
    by_layer: dict[int, dict[str, str]] = {}
    members: dict[str, list[str]] = {}
    for fallback, name in enumerate(names):
        by_layer.setdefault(layer_index_of(name, fallback), {})[category_of(name)] = name
        members.setdefault(category_of(name), []).append(name)
    basis: dict[str, list[str]] = {}
    for _, layer in sorted(by_layer.items()):
        for category, name in layer.items():
            basis.setdefault(category, []).append(name)
    return basis, members


def _node(name: str, base, category: str, v: np.ndarray, lambda_l, s_values, dropout: float, adapter_dtype):
    u, scale = rotation_of(np.asarray(dense_kernel(base), np.float32).T, v)
    if lambda_l is None:
        lambda_l = scale
    return FrodKernel(base=base, u=jnp.asarray(u).astype(base.dtype), lambda_l=jnp.asarray(lambda_l, adapter_dtype),
                      s_values=jnp.asarray(s_values, adapter_dtype), category=category, dropout=dropout)


def build_nodes(bases: dict[str, Any], cfg: FrodConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    """`bases` in torch's module order."""
    basis, members = _categories(list(bases))
    shared, nodes = {}, {}
    for c, category in enumerate(sorted(basis)):
        weights = [np.asarray(dense_kernel(bases[n]), np.float32).T for n in basis[category]]
        v = shared_basis(weights, cfg.regularization_alpha)
        n = v.shape[0]
        off_diagonal = n * n - n
        count = min(int(n * n * cfg.sparse_rate), off_diagonal)
        if cfg.sparse_rate > 0 and off_diagonal > 0:
            count = max(1, count)
        rng = np.random.default_rng([cfg.projection_prng_key, c])
        chosen = rng.permutation(off_diagonal)[:count]
        rows, within = chosen // (n - 1), chosen % (n - 1)
        cols = within + (within >= rows)  # skip the diagonal
        shared[category] = {"v": jnp.asarray(v), "rows": jnp.asarray(rows, jnp.int32), "cols": jnp.asarray(cols, jnp.int32)}
        for i, name in enumerate(members[category]):
            s_values = np.zeros(count, np.float32)
            node = _node(name, bases[name], category, v, None, s_values, cfg.frod_dropout, adapter_dtype)
            if not cfg.init_weights:  # PEFT: S ~ N(0, 0.1^2), lambda + N(0, 0.1^2)
                k1, k2 = jax.random.split(jax.random.fold_in(key, 1000 * c + i))
                node = node.replace(lambda_l=node.lambda_l + 0.1 * jax.random.normal(k1, node.lambda_l.shape),
                                    s_values=0.1 * jax.random.normal(k2, node.s_values.shape))
            nodes[name] = node
    return nodes, {SHARED: shared}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, FrodKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    shared = params.get(SHARED)
    if shared is None:
        raise LowraxError(f"FRoD params lack their shared bases at params[{SHARED!r}]")
    dropout = one_setting((n.dropout for n in nodes.values()), "FRoD", "frod_dropout")
    tensors = {}
    for category in sorted({n.category for n in nodes.values()}):
        entry = shared[category]
        n = entry["v"].shape[0]
        tensors[f"base_model.frod_V.{category}"] = np.asarray(entry["v"], np.float32)
        tensors[f"base_model.frod_s_indices.{category}"] = np.stack([np.asarray(entry["rows"]),
                                                                      np.asarray(entry["cols"])]).astype(np.int64)
        tensors[f"base_model.frod_s_size.{category}"] = np.asarray([n, n], np.int64)
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.frod_lambda_l"] = np.asarray(node.lambda_l, np.float32)
        tensors[f"{PREFIX}{name}.frod_lambda_s_values"] = np.asarray(node.s_values, np.float32)
    first = shared[min(n.category for n in nodes.values())]
    rate = float(first["rows"].shape[0]) / float(first["v"].shape[0]) ** 2  # what drew this many entries
    return tensors, {"frod_dropout": dropout, "projection_prng_key": 0, "save_projection": True, "sparse_rate": rate,
                     "regularization_alpha": 1e-3, "fan_in_fan_out": fan_in_fan_out(model), "bias": "none",
                     "init_weights": True,
                     "progressbar": False, "runtime_offload_base_weight": False}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"FRoD adapter_config.json has bias {config.get('bias')!r}; lowrax reads bias 'none' "
                              "(PEFT's default) only")
    names = [n for n in bases if n in set(adapted_modules(tensors, ".frod_lambda_l", bases, "FRoD"))]
    shared, nodes, used = {}, {}, set()
    for category, members in _categories(names)[1].items():
        keys = {part: f"base_model.frod_{part}.{category}" for part in ("V", "s_indices", "s_size")}
        missing = [k for k in keys.values() if k not in tensors]
        if missing:
            raise CheckpointError(f"FRoD adapter lacks {missing[0]}: it was saved with save_projection=false, and "
                                  "lowrax needs the bases and sparse patterns in the file; save it with "
                                  "save_projection=true")
        v = np.asarray(tensors[keys["V"]], np.float32)
        indices = np.asarray(tensors[keys["s_indices"]], np.int64)
        n = v.shape[0]
        if v.shape != (n, n) or indices.ndim != 2 or indices.shape[0] != 2 or ((indices < 0) | (indices >= n)).any():
            raise CheckpointError(f"FRoD tensors of category {category} do not fit: {keys['V']} {v.shape}, "
                                  f"{keys['s_indices']} {indices.shape}")
        used |= set(keys.values())
        shared[category] = {"v": jnp.asarray(v), "rows": jnp.asarray(indices[0], jnp.int32),
                            "cols": jnp.asarray(indices[1], jnp.int32)}
        for name in members:
            d_in, _ = bases[name].shape
            if d_in != n:
                raise CheckpointError(f"FRoD basis of category {category} is {n} wide, but {name} takes {d_in} inputs")
            lambda_l = adapter_tensor(tensors, name, "frod_lambda_l", (n,), "FRoD")
            s_values = adapter_tensor(tensors, name, "frod_lambda_s_values", (indices.shape[1],), "FRoD")
            used |= {f"{name}.frod_lambda_l", f"{name}.frod_lambda_s_values"}
            nodes[name] = _node(name, bases[name], category, v, lambda_l, s_values,
                                float(config.get("frod_dropout") or 0.0), adapter_dtype)
    return nodes, {SHARED: shared}, used


def to_config(config: dict) -> tuple[str, FrodConfig]:
    return "frod", FrodConfig(sparse_rate=float(config.get("sparse_rate", 0.01)),
                              regularization_alpha=float(config.get("regularization_alpha", 1e-3)),
                              projection_prng_key=config.get("projection_prng_key", 0),
                              frod_dropout=float(config.get("frod_dropout") or 0.0), **targeting_from_peft(config))


# --- registration ---------------------------------------------------------------------------------

register_method(AdapterMethod(name="frod", config=FrodConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              shared_keys=(SHARED,), module_order=True, frozen_from_base=True,
                              examples={"frod": lambda: FrodConfig(sparse_rate=0.05)}))
register_peft_format(PeftFormat(peft_type="FROD", write=write, read=read, to_config=to_config, module_order=True))
