"""Trainable tokens (PEFT `TrainableTokensConfig`, and LoRA's `trainable_token_indices`): chosen rows of
the word-embedding table are trained in full, the rest of the table stays frozen. A new special token's
embedding is learned without training (or saving) the whole table.

The table becomes a `TrainableTokens` node holding the frozen table (`base`), the chosen rows' trained
values (`rows` [k, hidden]) and their token ids (`indices` [k], frozen). Model code reads its `value`,
the table with those rows replaced (`core.node.resolve`), so no model needs a hook; where the output
head is tied to the table (SmolLM2, GPT-2), the head sees the trained rows too, as PEFT ties its token
adapter to the head. Merging leaves the table with the rows replaced; unmerging puts the node back.

PEFT format. Alone (`peft_type: TRAINABLE_TOKENS`): `<embedding module>.trainable_tokens_delta` (k,
hidden), the trained rows themselves (not a difference), and for a tied head
`lm_head.trainable_tokens_delta` (the same rows); `token_indices` and `target_modules` in the config.
Beside LoRA: `<embedding module>.token_adapter.trainable_tokens_delta` and the config's
`trainable_token_indices` (a list for the input embedding, or {module name: list}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import TargetConfig, default_targets, targeting_from_peft
from lowrax.core.checked import ConfigValueError, Count, conforms, owner_name
from lowrax.core.node import FULL, AdapterNode, is_node
from lowrax.core.tables import get_path, set_path
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, check_shape, one_setting

ROLE = "embedding"  # the module role (models.base.Model.module_roles) of a family's word-embedding table
DELTA = "trainable_tokens_delta"
COMPANION = ".token_adapter."  # LoRA's key infix for its token adapter


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainableTokensConfig(TargetConfig):
    """Trainable tokens' settings, with PEFT's names (target_modules None: the word embedding)."""

    token_indices: tuple[Count, ...] = ()  # the token ids whose embedding rows train
    init_weights: bool = True  # True: the rows start as the table's (the base model); False: standard normal

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.token_indices, dict):
            raise ConfigValueError(owner_name(self), "token_indices", self.token_indices,
                                   "a list of token ids (target_modules chooses the table)")
        check_token_spec(self, "token_indices", self.token_indices or ())


def check_indices(config, key: str, indices) -> None:
    if not indices:
        raise ConfigValueError(owner_name(config), key, indices, "a non-empty list of token ids")
    if len(set(indices)) != len(indices):
        raise ConfigValueError(owner_name(config), key, indices, "token ids without repeats")


def check_token_spec(config, key: str, spec) -> None:
    """LoRA's trainable_token_indices: None, token ids (for the word embedding) or {module name: token ids}."""
    if spec is None:
        return
    if isinstance(spec, int):
        spec = (spec,)
    if isinstance(spec, dict):
        for module, ids in spec.items():
            if not isinstance(module, str) or not isinstance(ids, (list, tuple)) or not conforms(tuple[Count, ...],
                                                                                                 tuple(ids)):
                raise ConfigValueError(owner_name(config), key, spec,
                                       "token ids, or a mapping of embedding module names to token ids")
            check_indices(config, f"{key}[{module!r}]", tuple(ids))
        object.__setattr__(config, key, {module: tuple(ids) for module, ids in spec.items()})
    else:
        check_indices(config, key, tuple(spec))
        object.__setattr__(config, key, tuple(spec))


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class TrainableTokens(AdapterNode):
    """base [vocab, hidden] frozen; rows [k, hidden] trained; indices [k] int32 frozen."""

    base: Any
    rows: jnp.ndarray
    indices: jnp.ndarray
    peft_type = "TRAINABLE_TOKENS"
    stands_for_array = True
    rides_along = True  # beside LoRA, in its file (trainable_token_indices)

    @property
    def value(self) -> jnp.ndarray:
        return self.base.at[self.indices].set(self.rows.astype(self.base.dtype))

    def with_value(self, table: jnp.ndarray) -> "TrainableTokens":
        return self.replace(rows=table[self.indices].astype(self.rows.dtype))

    def field_labels(self) -> dict:
        return {"rows": FULL}

    def field_axes(self) -> dict:
        return {"rows": (None, None), "indices": (None,)}  # a few rows: replicated

    def apply(self, x):
        raise LowraxError("TrainableTokens stands for an embedding table, not a linear layer; models read its value")


def embedding_modules(params: Any) -> dict[str, tuple[str, ...]]:
    """Dotted module name -> tree path of every embedding table (a dict with a 2-D `embedding`)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]:
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        if keys and keys[-1] == "embedding" and len(getattr(leaf, "shape", ())) == 2:
            out[".".join(keys[:-1])] = keys[:-1]
    return out


# --- build ----------------------------------------------------------------------------------------

def with_rows(name: str, module: dict, indices, rows, adapter_dtype, error=LowraxError) -> dict:
    """The embedding module dict with its table replaced by a TrainableTokens node of these rows (None:
    the table's own); token ids outside the table are an `error` naming its size."""
    table = module["embedding"]
    if isinstance(table, AdapterNode):
        raise error(f"{name} is already adapted ({type(table).__name__}); merge it first")
    indices = np.asarray(indices, np.int64)
    if indices.min() < 0 or indices.max() >= table.shape[0]:
        raise error(f"trainable token ids must be below {name}'s vocabulary size {table.shape[0]}; "
                    f"got {int(indices.max())}")
    rows = jnp.take(table, jnp.asarray(indices), axis=0) if rows is None else rows
    return dict(module, embedding=TrainableTokens(base=table, rows=jnp.array(rows, adapter_dtype, copy=True),
                                                  indices=jnp.asarray(indices, jnp.int32)))


def token_nodes(bases: dict[str, dict], indices_for, init_weights: bool, key, adapter_dtype) -> dict:
    """{module name: {"embedding": TrainableTokens}} for each embedding module dict in `bases`;
    `indices_for(name)` gives its token ids."""
    nodes = {}
    for i, (name, module) in enumerate(bases.items()):
        indices = indices_for(name)
        rows = None if init_weights else jax.random.normal(jax.random.fold_in(key, i),
                                                           (len(indices), module["embedding"].shape[1]))
        nodes[name] = with_rows(name, module, indices, rows, adapter_dtype)
    return nodes


def input_embedding(tables, model_type: str | None) -> str | None:
    """The name of the model's word-embedding table among `tables` (its family's "embedding" role), or None."""
    suffixes = default_targets("trainable_tokens", (ROLE,), model_type) or ()
    matches = [n for n in tables if n.split(".")[-1] in suffixes]
    return matches[0] if len(matches) == 1 else None


def tables_named(spec: dict, tables, error) -> dict[str, tuple[int, ...]]:
    """{table's module name: token ids} for {module name or suffix: token ids}; each must name one table."""
    wanted = {}
    for module, ids in spec.items():
        matches = [n for n in tables if n == module or n.endswith("." + module)]
        if len(matches) != 1:
            raise error(f"trainable_token_indices names {module!r}, which matches {len(matches) or 'no'} "
                        f"embedding tables of this model ({', '.join(sorted(tables))})")
        wanted[matches[0]] = tuple(int(i) for i in ids)
    return wanted


def with_token_rows(tree: dict, spec, key, adapter_dtype, model_type: str | None) -> dict:
    """`tree` with the embedding rows of LoRA's `trainable_token_indices` trained (set in place)."""
    modules = embedding_modules(tree)
    if isinstance(spec, dict):
        wanted = tables_named(spec, modules, LowraxError)
    else:
        table = input_embedding(modules, model_type)
        if table is None:
            raise LowraxError(f"trainable_token_indices as a list needs the model's word embedding, unknown for "
                              f"model_type {model_type!r}: give {{module name: token ids}} with one of "
                              f"{', '.join(sorted(modules))}")
        wanted = {table: tuple(spec)}
    bases = {name: get_path(tree, modules[name]) for name in wanted}
    for name, module in token_nodes(bases, wanted.get, True, key, adapter_dtype).items():
        set_path(tree, modules[name], module)
    return tree


def build_nodes(bases: dict[str, dict], cfg: TrainableTokensConfig, key, adapter_dtype,
                model_type=None) -> tuple[dict, dict]:
    return token_nodes(bases, lambda _: cfg.token_indices, cfg.init_weights, key, adapter_dtype), {}


# --- PEFT format ----------------------------------------------------------------------------------

def module_of(node_name: str) -> str:
    return node_name.removesuffix(".embedding")


def tied_head(params: Any, model) -> bool:
    """Whether the model's output head is the embedding table (PEFT then saves the head's copy too)."""
    return bool(model is not None and model.is_causal_lm and isinstance(params, dict) and "lm_head" not in params)


def write(nodes: dict[str, TrainableTokens], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    indices = one_setting((tuple(int(i) for i in np.asarray(n.indices)) for n in nodes.values()),
                          "trainable tokens", "token_indices")
    tensors = {f"{PREFIX}{module_of(name)}.{DELTA}": np.asarray(node.rows, np.float32) for name, node in nodes.items()}
    if tied_head(params, model) and len(nodes) == 1:
        tensors[f"{PREFIX}lm_head.{DELTA}"] = next(iter(tensors.values()))
    modules = sorted(module_of(name) for name in nodes)
    target = modules[0] if len(modules) == 1 else "^(" + "|".join(m.replace(".", r"\.") for m in modules) + ")$"
    return tensors, {"token_indices": list(indices), "target_modules": target, "init_weights": True}


def read_rows(tensors: dict, key: str, table, count: int) -> np.ndarray:
    if key not in tensors:
        raise CheckpointError(f"trainable tokens adapter lacks {PREFIX}{key}")
    check_shape(key.rsplit(".", 1)[0], key.rsplit(".", 1)[1], tensors[key], (count, table.shape[1]))
    return np.asarray(tensors[key], np.float32)


def table_of(bases: dict, name: str):
    if name not in bases:
        raise CheckpointError(f"trainable tokens adapter targets {name!r}, which is not an embedding table of this "
                              f"model; its tables: {', '.join(sorted(bases))}")
    return bases[name]["embedding"]


def place(bases: dict, name: str, indices, tensors: dict, key: str, adapter_dtype) -> dict:
    """The module `name` of `bases` with the rows of the file's tensor `key` trained at `indices`."""
    rows = read_rows(tensors, key, table_of(bases, name), len(indices))
    return with_rows(name, bases[name], indices, rows, adapter_dtype, CheckpointError)


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    indices = [int(i) for i in config.get("token_indices") or []]
    if not indices:
        raise CheckpointError("trainable tokens adapter_config.json has no token_indices")
    names = sorted(k.removesuffix(f".{DELTA}") for k in tensors if k.endswith(f".{DELTA}") and k != f"lm_head.{DELTA}"
                   and COMPANION not in k)
    nodes, used = {}, set()
    for name in names:
        key = f"{name}.{DELTA}"
        nodes[name] = place(bases, name, indices, tensors, key, adapter_dtype)
        used.add(key)
    if f"lm_head.{DELTA}" in tensors:  # the tied head's copy of the same rows
        used.add(f"lm_head.{DELTA}")
    if not nodes:
        raise CheckpointError(f"trainable tokens adapter holds no <embedding>.{DELTA} tensor")
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, TrainableTokensConfig]:
    return "trainable_tokens", TrainableTokensConfig(token_indices=tuple(config.get("token_indices") or ()),
                                                     **targeting_from_peft(config))


# --- beside another method (LoRA's trainable_token_indices) ------------------------------------------

def write_carried(nodes: dict[str, TrainableTokens], params: Any, model) -> tuple[dict, dict]:
    """(tensors, {"trainable_token_indices": ...}) of token nodes saved beside LoRA's own (its
    `PeftFormat.write_carried`)."""
    word_table = input_embedding(embedding_modules(params), getattr(model, "model_type", None))
    tensors = {f"{PREFIX}{module_of(n)}{COMPANION}{DELTA}": np.asarray(node.rows, np.float32)
               for n, node in nodes.items()}
    by_module = {module_of(n): [int(i) for i in np.asarray(node.indices)] for n, node in nodes.items()}
    if list(by_module) == [word_table]:
        return tensors, {"trainable_token_indices": by_module[word_table]}
    return tensors, {"trainable_token_indices": by_module}


def read_carried(tensors: dict, config: dict, params: Any, model, adapter_dtype) -> tuple[dict, set]:
    """({tree path: embedding module with its TrainableTokens}, used keys) for LoRA's `trainable_token_indices`
    (its `PeftFormat.read_carried`)."""
    spec = config.get("trainable_token_indices")
    if spec is None:
        return {}, set()
    places = embedding_modules(params)
    bases = {name: get_path(params, path) for name, path in places.items()}
    if isinstance(spec, dict):
        wanted = tables_named(spec, bases, CheckpointError)
    else:
        word_table = input_embedding(bases, getattr(model, "model_type", None))
        if word_table is None:
            raise CheckpointError("trainable_token_indices is a list, which PEFT applies to the input embedding; "
                                  "pass model= to load_peft so lowrax knows which table that is")
        wanted = {word_table: [int(i) for i in spec]}
    nodes, used = {}, set()
    for name, ids in wanted.items():
        key = f"{name}{COMPANION}{DELTA}"
        nodes[places[name]] = place(bases, name, ids, tensors, key, adapter_dtype)
        used.add(key)
    return nodes, used


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="trainable_tokens", config=TrainableTokensConfig, build=build_nodes,
                              default_roles=(ROLE,), modules=embedding_modules, module_kind="embedding",
                              examples={"trainable_tokens": lambda: TrainableTokensConfig(token_indices=tuple(range(2, 60, 2)))}))
register_peft_format(PeftFormat(peft_type="TRAINABLE_TOKENS", write=write, read=read, to_config=to_config,
                                modules=embedding_modules))
