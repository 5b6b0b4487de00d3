"""Exchange adapters with PEFT: `adapter_model.safetensors` + `adapter_config.json`.

Keys are PEFT's (`base_model.model.<module>.lora_A.weight`), in torch Linear
layout: lora_A is (r, in) and lora_B is (out, r), the transposes of lowrax's
A [in, r] and B [r, out]. `modules_to_save` tensors are stored under their
HF key (`base_model.model.classifier.weight`). GPT-2 adapters carry
`fan_in_fan_out: true`, as PEFT requires for its Conv1D layers.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from lowrax.errors import CheckpointError, LowraxError
from lowrax.io import tables
from lowrax.io.atomic import write_directory
from lowrax.lora import linear_modules, lora_scale, pattern_value
from lowrax.nodes import FullyTrained, LoraKernel

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _lora_nodes(params: Any) -> dict[str, LoraKernel]:
    """Dotted module name -> LoraKernel for every adapted kernel."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, (LoraKernel, FullyTrained)))[0]:
        if isinstance(leaf, LoraKernel):
            out[".".join(str(p.key) for p in path[:-1])] = leaf
    return out


def _fully_trained(params: Any, model) -> dict[str, np.ndarray]:
    """HF key -> torch-layout array for every `FullyTrained` leaf (needs the model's tensor table)."""
    out = {}
    specs = {t.path: t for t in model.tensors()} if model is not None else {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, FullyTrained))[0]:
        if isinstance(leaf, FullyTrained):
            keys = tuple(str(p.key) for p in path)
            if keys not in specs:
                raise LowraxError(f"saving the fully-trained leaf {'/'.join(keys)} needs the model (save_peft(..., model=model))")
            spec = specs[keys]
            out[spec.hf_key] = spec.to_hf(np.asarray(jax.device_get(leaf.value), np.float32))
    return out


def _adapter_config(nodes: dict[str, LoraKernel], model, use_rslora: bool, modules_to_save: list[str],
                    base_model: str | None) -> dict:
    def alpha_of(node):
        return node.scale * (math.sqrt(node.rank) if use_rslora else node.rank)

    r = Counter(n.rank for n in nodes.values()).most_common(1)[0][0]
    alpha = Counter(round(alpha_of(n), 6) for n in nodes.values()).most_common(1)[0][0]
    rank_pattern = {name: n.rank for name, n in nodes.items() if n.rank != r}
    alpha_pattern = {name: round(alpha_of(n), 6) for name, n in nodes.items() if round(alpha_of(n), 6) != alpha}
    suffixes = sorted({name.split(".")[-1] for name in nodes})
    # A suffix list when it selects exactly the adapted modules, else an exact regex.
    targets: Any = suffixes
    if model is not None:
        existing = {".".join(t.path[:-1]) for t in model.tensors() if t.path[-1] == "kernel"}
        if {n for n in existing if n.split(".")[-1] in suffixes} != set(nodes):
            targets = "^(" + "|".join(sorted(map(lambda s: s.replace(".", r"\."), nodes))) + ")$"
    dropout = Counter(n.dropout for n in nodes.values()).most_common(1)[0][0]
    model_type = getattr(model, "model_type", None)
    return {
        "peft_type": "LORA",
        "task_type": ("CAUSAL_LM" if getattr(model, "is_causal_lm", True) else "SEQ_CLS"),
        "base_model_name_or_path": base_model,
        "r": int(r),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": bool(use_rslora),
        "fan_in_fan_out": model_type == "gpt2",
        "bias": "none",
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_peft(params: Any, out_dir: str | Path, model=None, *, use_rslora: bool = False,
              base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write the adapters of `params` as a PEFT LoRA adapter directory (atomically)."""
    nodes = _lora_nodes(params)
    if not nodes:
        raise LowraxError("params have no LoRA adapters to save; wrap them with lowrax.lora.wrap first")
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(node.a, np.float32).T)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(node.b, np.float32).T)
    full = _fully_trained(params, model)
    tensors.update({PREFIX + k: v for k, v in full.items()})
    modules_to_save = sorted({k.split(".")[0] for k in full})
    config = _adapter_config(nodes, model, use_rslora, modules_to_save, base_model)

    def fill(staging: Path) -> None:
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_directory(out_dir, fill, overwrite)


def load_peft(params: Any, adapter_dir: str | Path, model=None, adapter_dtype=jnp.float32) -> Any:
    """Wrap plain `params` with the LoRA adapter PEFT saved in `adapter_dir`."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG).exists() or not (adapter_dir / WEIGHTS).exists():
        raise CheckpointError(f"{adapter_dir} is not a PEFT adapter: expected {CONFIG} and {WEIGHTS}")
    config = json.loads((adapter_dir / CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise LowraxError(f"{adapter_dir}: adapter type {kind!r} is not supported by load_peft (supported: LORA)")
    tensors = load_file(str(adapter_dir / WEIGHTS))
    tensors = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in tensors.items()}
    modules = linear_modules(params)
    out = jax.tree.map(lambda x: x, params)
    use_rslora = bool(config.get("use_rslora", False))
    lora_names = sorted({k.rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k})
    for name in lora_names:
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if name not in modules:
            raise CheckpointError(f"adapter tensor {PREFIX}{a_key} targets {name!r}, which is not a linear module of this model")
        if b_key not in tensors:
            raise CheckpointError(f"adapter has {PREFIX}{a_key} but no {PREFIX}{b_key}")
        path = modules[name]
        base = tables.get_path(out, path)
        d_in, d_out = base.shape
        a_t, b_t = tensors[a_key], tensors[b_key]
        r = a_t.shape[0]
        if a_t.shape != (r, d_in) or b_t.shape != (d_out, r):
            raise CheckpointError(
                f"adapter tensors for {name} do not fit the model: {PREFIX}{a_key} is {a_t.shape} and "
                f"{PREFIX}{b_key} is {b_t.shape}, expected (r, {d_in}) and ({d_out}, r)"
            )
        alpha = float(pattern_value(name, config.get("alpha_pattern"), config.get("lora_alpha", 8)))
        tables.set_path(out, path, LoraKernel(base=base, a=jnp.asarray(a_t.T, adapter_dtype), b=jnp.asarray(b_t.T, adapter_dtype),
                                              scale=lora_scale(alpha, r, use_rslora),
                                              dropout=float(config.get("lora_dropout", 0.0))))
    rest = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]
    if rest:
        if model is None:
            raise LowraxError(f"{adapter_dir} holds fully-trained modules ({rest[0]}, ...); pass model= to load them")
        by_key = {t.hf_key: t for t in model.tensors()}
        for key in rest:
            spec = by_key.get(key)
            if spec is None:
                raise CheckpointError(f"adapter tensor {PREFIX}{key} matches no parameter of this {model.model_type} model")
            if tuple(tensors[key].shape) != spec.hf_shape:
                raise CheckpointError(f"adapter tensor {PREFIX}{key} has shape {tensors[key].shape}, expected {spec.hf_shape}")
            tables.set_path(out, spec.path, FullyTrained(jnp.asarray(spec.from_hf(tensors[key]))))
    return out
