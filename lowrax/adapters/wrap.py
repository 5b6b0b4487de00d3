"""`wrap(params, cfg, key)`: any registered method as a pure transform of the parameter tree.

The method is found by the type of `cfg` (`LoraConfig`, `IA3Config`, ...). The
targeted kernels become that method's nodes; `modules_to_save` leaves become
`FullyTrained` nodes; arrays the method shares across layers go under their
own top-level keys. The input tree is left untouched.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lowrax.core.node import VIRTUAL_TOKENS_KEY, FullyTrained, is_adapter, is_node
from lowrax.adapters.registry import method_for_config
from lowrax.adapters.targets import linear_modules, select_targets, torch_module_order
from lowrax.errors import LowraxError
from lowrax.core.tables import get_path, set_path


def wrap(params: Any, cfg, key, model_type: str | None = None, adapter_dtype=jnp.float32, *, model=None,
         calibration=None) -> Any:
    """Replace the kernels `cfg` targets by the adapter nodes of its method.

    key: a `jax.random.key` for the adapter initialisation.
    model_type: selects PEFT's default targets of the method when `cfg.target_modules` is None.
    adapter_dtype: the dtype of the adapter's own arrays (float32 keeps optimizer state exact
    over a bfloat16 base).
    model: the model (its model_type is then the default); prompt-learning methods need it
    for its dimensions.
    calibration: what `lowrax.lora.calibrate` measured on calibration data, for LoRA's data-driven
    inits (corda, eva, lora_ga).
    """
    method = method_for_config(cfg)
    if model is not None and model_type is None:
        model_type = model.model_type
    if method.build_virtual is not None:
        return _with_virtual_tokens(params, cfg, key, adapter_dtype, model, method)
    if method.build_inserted is not None:
        return _with_inserted_nodes(params, cfg, key, adapter_dtype, model, method)
    modules, targets = targeted_modules(params, cfg, model_type)
    if method.module_order:
        if model is None:
            raise LowraxError(f"{method.name} numbers the adapted modules in the model's order: pass the model "
                              "(wrap(params, cfg, key, model=model))")
        targets = torch_module_order(model, targets)
    out = jax.tree.map(lambda x: x, params, is_leaf=is_node)  # a fresh copy of the dict structure
    bases = {}
    for name in targets:
        base = get_path(out, modules[name])
        if is_adapter(base):
            raise LowraxError(f"{name} is already adapted ({type(base).__name__}); merge it first")
        bases[name] = base
    options = {}
    if calibration is not None:
        if not method.calibrated:
            raise LowraxError(f"{method.name} takes no calibration data (only LoRA's corda, eva and lora_ga inits do)")
        options["calibration"] = calibration
    if method.sees_biases:  # {module name: its layer's bias, or None}
        options["biases"] = {name: _layer_of(out, modules[name]).get("bias") for name in bases}
    nodes, shared = method.build(bases, cfg, key, adapter_dtype, model_type, **options)
    for name, node in nodes.items():
        set_path(out, modules[name], node)
    out.update(shared)
    if method.extend is not None:  # what else it adapts (LoRA's trainable token rows)
        out = method.extend(out, cfg, jax.random.fold_in(key, 1 << 20), adapter_dtype, model_type)
    return _with_modules_to_save(out, cfg)


def _layer_of(params: Any, kernel_path: tuple) -> dict:
    layer = get_path(params, kernel_path[:-1])
    return layer if isinstance(layer, dict) else {}


def targeted_modules(params: Any, cfg, model_type: str | None) -> tuple[dict[str, tuple], list[str]]:
    """({module name: tree path} of the modules the method can adapt, the names `cfg` targets)."""
    method = method_for_config(cfg)
    modules = (method.modules or linear_modules)(params)
    return modules, select_targets(params, cfg, model_type, method.default_roles, method.name, modules,
                                   method.module_kind)


def _with_virtual_tokens(params, cfg, key, adapter_dtype, model, method) -> Any:
    """A prompt-learning method: its node under the tree's `prompt_encoder` key."""
    if model is None:
        raise LowraxError(f"{method.name} needs the model for its dimensions: wrap(params, cfg, key, model=model)")
    if not isinstance(params, dict) or VIRTUAL_TOKENS_KEY in params:
        raise LowraxError(f"these params already carry a prompt-learning adapter under {VIRTUAL_TOKENS_KEY!r}")
    out = dict(params)
    out[VIRTUAL_TOKENS_KEY] = method.build_virtual(params, cfg, key, adapter_dtype, model)
    return _with_modules_to_save(out, cfg)


def _with_inserted_nodes(params, cfg, key, adapter_dtype, model, method) -> Any:
    """A method whose nodes sit at paths of their own (bottleneck adapters' sites)."""
    if model is None:
        raise LowraxError(f"{method.name} needs the model for its sites: wrap(params, cfg, key, model=model)")
    out = jax.tree.map(lambda x: x, params, is_leaf=is_node)
    for path, node in method.build_inserted(params, cfg, key, adapter_dtype, model).items():
        try:
            existing = get_path(out, path)
        except (KeyError, TypeError):
            existing = None
        if existing is not None:
            raise LowraxError(f"{'.'.join(path)} already holds an adapter; merge or remove it first")
        set_path(out, path, node)
    return _with_modules_to_save(out, cfg)


def _with_modules_to_save(out: dict, cfg) -> dict:
    for module in cfg.modules_to_save:
        if module not in out:
            raise LowraxError(f"modules_to_save entry {module!r} is not a top-level module; existing: {', '.join(sorted(out))}")
        out[module] = jax.tree.map(FullyTrained, out[module])
    return out


def adapter_nodes(params: Any) -> dict[str, Any]:
    """Dotted module name -> adapter node for every adapted kernel; a node in place of another
    array (LN tuning's norm weights) is named by its full path (`...input_layernorm.scale`)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]:
        if is_adapter(leaf):
            keys = [str(p.key) for p in path]
            out[".".join(keys[:-1] if keys[-1] == "kernel" else keys)] = leaf
    return out
