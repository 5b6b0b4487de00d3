"""Exchange adapters with PEFT: `save_peft` and `load_peft` for every registered method.

The method's part of the format (its tensors and config fields) is the
`PeftFormat` registered for its `peft_type`; this module does what all share:
finding the adapter nodes, `modules_to_save` tensors (stored under their HF
key, `base_model.model.classifier.weight`), the common config fields, and the
atomic write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.core.node import FullyTrained, is_node
from lowrax.adapters.registry import format_for_config, peft_format
from lowrax.adapters.targets import linear_modules, torch_module_order
from lowrax.adapters.tree import without_shared
from lowrax.adapters.wrap import adapter_nodes
from lowrax.core.checked import ConfigValueError
from lowrax.errors import CheckpointError, LowraxError
from lowrax.io.safetensors_dir import read_json_file, read_tensor_file, write_tensor_file
from lowrax.core import tables
from lowrax.core.atomic import write_directory
from lowrax.peft.common import CONFIG, OMIT, PREFIX, WEIGHTS, common_config


def _fully_trained(params: Any, model) -> dict[str, np.ndarray]:
    """HF key -> torch-layout array for every `FullyTrained` leaf (needs the model's tensor table)."""
    out = {}
    specs = {t.path: t for t in model.tensors()} if model is not None else {}
    own = without_shared(params)  # a method's shared arrays (VB-LoRA's trained bank) are its format's to write
    for path, leaf in jax.tree_util.tree_flatten_with_path(own, is_leaf=lambda x: isinstance(x, FullyTrained))[0]:
        if isinstance(leaf, FullyTrained):
            keys = tuple(str(p.key) for p in path)
            if keys not in specs:
                raise LowraxError(f"saving the fully-trained leaf {'/'.join(keys)} needs the model (save_peft(..., model=model))")
            spec = specs[keys]
            out[spec.hf_key] = spec.to_hf(np.asarray(jax.device_get(leaf.value), np.float32))
    return out


def save_peft(params: Any, out_dir: str | Path, model=None, *, base_model: str | None = None,
              overwrite: bool = False, initial: Any = None, use_rslora: bool | None = None) -> Path:
    """Write the adapters of `params` as a PEFT adapter directory (atomically).

    One directory holds one method (one `peft_type`). `initial`: the tree right after
    `wrap`, needed by adapters that PEFT stores converted (PiSSA). `use_rslora`: LoRA's
    scaling in the config (None: as the nodes record it; other methods ignore it).
    """
    nodes = adapter_nodes(params)
    if not nodes:
        raise LowraxError("params have no adapters to save; wrap them with lowrax.wrap first")
    # nodes that ride along in another method's file (LoRA's trainable token rows)
    riders = {n: x for n, x in nodes.items() if x.rides_along}
    if riders and len(riders) < len(nodes):
        nodes = {n: x for n, x in nodes.items() if n not in riders}
    else:
        riders = {}
    peft_types = {n.peft_type for n in nodes.values()}
    if len(peft_types) > 1:
        kinds = sorted({type(n).__name__ for n in nodes.values()})
        raise LowraxError(f"one PEFT adapter holds one method; these params mix {', '.join(kinds)}")
    peft_type = peft_types.pop()
    fmt = peft_format(peft_type)
    full = _fully_trained(params, model)
    if fmt.save_directory is not None:  # a format with its own layout (AdapterHub's)
        return fmt.save_directory(params, nodes, out_dir, model, overwrite=overwrite, base_model=base_model,
                                  fully_trained=full)
    if initial is None and any(n.exports_from_initial for n in nodes.values()):
        raise LowraxError(
            f"this {peft_type} adapter is exported converted against its initial value (PiSSA: plain LoRA over the "
            "original weights), which needs the adapter as initialised: "
            "save_peft(params, out_dir, model, initial=params_right_after_wrap)")
    modules_to_save = sorted({k.split(".")[0] for k in full})
    tensors, fields = fmt.write(nodes, params, model=model, initial=initial, use_rslora=use_rslora)
    if riders:
        kinds = sorted({type(x).__name__ for x in riders.values()})
        if fmt.write_carried is None:
            raise LowraxError(f"PEFT's {peft_type} format has no place for {', '.join(kinds)} beside it (PEFT keeps "
                              "trainable token rows beside LoRA only): save them as an adapter of their own")
        carried_tensors, carried_fields = fmt.write_carried(riders, params, model)
        tensors, fields = tensors | carried_tensors, fields | carried_fields
    config = {k: v for k, v in (common_config(peft_type, nodes, model, modules_to_save, base_model) | fields).items()
              if v is not OMIT}
    tensors = tensors | {fmt.modules_to_save_prefix + k: v for k, v in full.items()}

    def fill(staging: Path) -> None:
        write_tensor_file(tensors, staging / WEIGHTS)
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_directory(out_dir, fill, overwrite)


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The `adapter_config.json` of a PEFT adapter directory (checked to hold its weights too),
    or of a directory in a format that recognises its config (AdapterHub's)."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / CONFIG).exists():
        config = read_json_file(adapter_dir / CONFIG, "a PEFT adapter_config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{adapter_dir / CONFIG} must hold a JSON object of settings, got "
                                  f"{type(config).__name__}")
        check_adapter_settings(config, adapter_dir / CONFIG)
        if (adapter_dir / WEIGHTS).exists():
            return config
        if "peft_type" not in config and format_for_config(config, f"{adapter_dir}: ").load_directory is not None:
            return config
    raise CheckpointError(f"{adapter_dir} is not a PEFT adapter: expected {CONFIG} and {WEIGHTS}")


def check_adapter_settings(config: dict, path: Path) -> None:
    """The settings' types and ranges, checked by the method's own config class: `r: "abc"` is named
    with the file. (Only field errors are raised here; whether lowrax supports the rest of the
    config is decided where the adapter is loaded.)"""
    try:
        format_for_config(config, f"{path.parent}: ").to_config(config)
    except ConfigValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (LowraxError, ValueError, TypeError, KeyError):
        pass  # unsupported or unusual settings are reported by the loader, in context


def read_adapter_dir(adapter_dir: str | Path) -> tuple[dict, dict]:
    """(config, tensors with the `base_model.model.` prefix removed) of a PEFT adapter directory."""
    config = read_adapter_config(adapter_dir)
    tensors = read_tensor_file(Path(adapter_dir) / WEIGHTS)
    return config, {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in tensors.items()}


def load_peft(params: Any, adapter_dir: str | Path, model=None, adapter_dtype=jnp.float32) -> Any:
    """Wrap plain `params` with the adapter PEFT saved in `adapter_dir` (any registered `peft_type`)."""
    fmt = format_for_config(read_adapter_config(adapter_dir), where=f"{adapter_dir}: ")
    if fmt.load_directory is not None:  # a format with its own layout (AdapterHub's)
        return fmt.load_directory(params, adapter_dir, model, adapter_dtype)
    config, tensors = read_adapter_dir(adapter_dir)
    if model is not None:  # an adapter saved against an older transformers' module names (ViT's)
        config, tensors = current_names(config, tensors, model)
    modules = (fmt.modules or linear_modules)(params)
    if fmt.module_order:
        if model is None:
            raise LowraxError(f"a {config.get('peft_type')} adapter numbers its modules in the model's order: pass the "
                              "model (load_peft(params, adapter_dir, model))")
        modules = {name: modules[name] for name in torch_module_order(model, modules)}
    out = jax.tree.map(lambda x: x, params, is_leaf=is_node)
    bases = {name: tables.get_path(out, path) for name, path in modules.items()}
    try:
        nodes, shared, used = fmt.read(tensors, config, bases, adapter_dtype)
        carried, carried_keys = ({}, set()) if fmt.read_carried is None else fmt.read_carried(
            tensors, config, params, model, adapter_dtype)
        used = used | carried_keys
        for path, value in carried.items():
            tables.set_path(out, path, value)
    except CheckpointError as e:
        raise CheckpointError(f"{adapter_dir}: {e}") from None
    for name, node in nodes.items():
        tables.set_path(out, modules[name], node)
    for node in shared.values():
        if hasattr(node, "check_model"):  # prompt learning: made for a model of these dimensions?
            if model is None:
                raise LowraxError(f"loading a {node.peft_type} adapter needs the model: load_peft(params, dir, model)")
            node.check_model(model)
    out.update(shared)
    rest = [k for k in tensors if k not in used]
    if rest:
        if model is None:
            raise LowraxError(f"{adapter_dir} holds fully-trained modules ({rest[0]}, ...); pass model= to load them")
        # `read_adapter_dir` took off PREFIX; a format that stores them less deep (prompt learning's
        # base_model.classifier.weight) still has its own prefix on
        own = "" if fmt.modules_to_save_prefix == PREFIX else fmt.modules_to_save_prefix
        put_fully_trained(out, {k.removeprefix(own): tensors[k] for k in rest}, model,
                          lambda k: f"adapter tensor {fmt.modules_to_save_prefix}{k}")
    return out


def current_names(config: dict, tensors: dict, model) -> tuple[dict, dict]:
    """The adapter's tensor keys and target_modules in the names the model's tree uses (`Model.adapter_key`)."""
    tensors = {model.adapter_key(k): v for k, v in tensors.items()}
    targets = config.get("target_modules")
    if isinstance(targets, list):
        config = {**config, "target_modules": [model.adapter_module_name(t) for t in targets]}
    return config, tensors


def put_fully_trained(tree: Any, tensors: dict, model, describe=lambda k: f"tensor {k}") -> None:
    """Set each {HF key: torch-layout array} in `tree` as a `FullyTrained` leaf (a classifier trained
    with the adapter), or a CheckpointError naming the tensor (`describe(key)`) that fits no parameter."""
    by_key = {t.hf_key: t for t in model.tensors()}
    for key, value in tensors.items():
        spec = by_key.get(key)
        if spec is None:
            raise CheckpointError(f"{describe(key)} matches no parameter of this {model.model_type} model")
        if tuple(value.shape) != spec.hf_shape:
            raise CheckpointError(f"{describe(key)} has shape {tuple(value.shape)}, expected {spec.hf_shape}")
        tables.set_path(tree, spec.path, FullyTrained(jnp.asarray(spec.from_hf(value))))
