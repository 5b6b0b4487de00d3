"""Exchange adapters with PEFT: `adapter_model.safetensors` + `adapter_config.json`.

Keys are PEFT's (`base_model.model.<module>.lora_A.weight`), in torch Linear
layout: lora_A is (r, in) and lora_B is (out, r), the transposes of lowrax's
A [in, r] and B [r, out]. `modules_to_save` tensors are stored under their
HF key (`base_model.model.classifier.weight`). GPT-2 adapters carry
`fan_in_fan_out: true`, as PEFT requires for its Conv1D layers.

Variants: DoRA adds `<module>.lora_magnitude_vector` and `use_dora: true`;
VeRA is its own format (`lowrax.peft_vera`); LoRA-FA is plain LoRA; PiSSA
and Delta-LoRA adapters are written as the plain rank-2r LoRA over the
original base that gives the same weights (PEFT's PiSSA conversion).
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
from lowrax.nodes import FullyTrained, LoraKernel, is_adapter, is_node
from lowrax.variants import DeltaLoraKernel, DoraKernel, delta_lora, pissa

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def adapter_nodes(params: Any) -> dict[str, Any]:
    """Dotted module name -> adapter node for every adapted kernel."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]:
        if is_adapter(leaf):
            out[".".join(str(p.key) for p in path[:-1])] = leaf
    return out


def _as_peft_lora(nodes: dict[str, Any], initial: Any) -> dict[str, Any]:
    """The nodes in PEFT's LoRA terms: Delta-LoRA and PiSSA become equivalent plain LoRA."""
    out = {}
    initial_nodes = adapter_nodes(initial) if initial is not None else {}
    for name, node in nodes.items():
        if isinstance(node, DeltaLoraKernel):
            node = delta_lora.as_plain_lora(node)
        elif isinstance(node, LoraKernel) and node.pissa_residual:
            if name not in initial_nodes:
                raise LowraxError(
                    "a PiSSA adapter is exported as plain LoRA over the original weights, which needs the adapter "
                    "as initialised: save_peft(params, out_dir, model, initial=params_right_after_wrap)")
            node = pissa.to_plain_lora(node, initial_nodes[name], node.base)
        out[name] = node
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


def target_spec(nodes: dict[str, Any], model) -> Any:
    """PEFT's `target_modules` for exactly these modules: a suffix list when it selects
    exactly them, else an exact regex of their names."""
    suffixes = sorted({name.split(".")[-1] for name in nodes})
    if model is not None:
        existing = {".".join(t.path[:-1]) for t in model.tensors() if t.path[-1] == "kernel"}
        if {n for n in existing if n.split(".")[-1] in suffixes} != set(nodes):
            return "^(" + "|".join(sorted(map(lambda s: s.replace(".", r"\."), nodes))) + ")$"
    return suffixes


def _adapter_config(nodes: dict[str, Any], model, use_rslora: bool, modules_to_save: list[str],
                    base_model: str | None) -> dict:
    def alpha_of(node):
        return node.scale * (math.sqrt(node.rank) if use_rslora else node.rank)

    r = Counter(n.rank for n in nodes.values()).most_common(1)[0][0]
    alpha = Counter(round(alpha_of(n), 6) for n in nodes.values()).most_common(1)[0][0]
    rank_pattern = {name: n.rank for name, n in nodes.items() if n.rank != r}
    alpha_pattern = {name: round(alpha_of(n), 6) for name, n in nodes.items() if round(alpha_of(n), 6) != alpha}
    targets = target_spec(nodes, model)
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
        "use_dora": all(isinstance(n, DoraKernel) for n in nodes.values()),
        "inference_mode": True,
    }


def save_peft(params: Any, out_dir: str | Path, model=None, *, use_rslora: bool = False,
              base_model: str | None = None, overwrite: bool = False, initial: Any = None) -> Path:
    """Write the adapters of `params` as a PEFT adapter directory (atomically).

    LoRA, LoRA-FA, rsLoRA, DoRA, Delta-LoRA and PiSSA are written as PEFT LoRA (DoRA with
    `use_dora`); VeRA as PEFT VeRA. `initial`: the tree right after `lora.wrap`, needed to
    convert a PiSSA adapter to plain LoRA over the original weights.
    """
    nodes = adapter_nodes(params)
    if not nodes:
        raise LowraxError("params have no adapters to save; wrap them with lowrax.lora.wrap first")
    kinds = {type(n).__name__ for n in nodes.values()}
    full = _fully_trained(params, model)
    modules_to_save = sorted({k.split(".")[0] for k in full})
    if len(kinds) > 1 and kinds & {"VeraKernel", "DoraKernel"}:
        raise LowraxError(f"one PEFT adapter holds one method; these params mix {', '.join(sorted(kinds))}")
    if "VeraKernel" in kinds:
        from lowrax.peft_vera import vera_tensors_and_config

        tensors, config = vera_tensors_and_config(params, nodes, model, modules_to_save, base_model)
    else:
        nodes = _as_peft_lora(nodes, initial)
        tensors = {}
        for name, node in nodes.items():
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(node.a, np.float32).T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(node.b, np.float32).T)
            if isinstance(node, DoraKernel):
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.asarray(node.magnitude, np.float32)
        config = _adapter_config(nodes, model, use_rslora, modules_to_save, base_model)
    tensors.update({PREFIX + k: v for k, v in full.items()})

    def fill(staging: Path) -> None:
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_directory(out_dir, fill, overwrite)


def load_peft(params: Any, adapter_dir: str | Path, model=None, adapter_dtype=jnp.float32) -> Any:
    """Wrap plain `params` with the adapter PEFT saved in `adapter_dir` (LoRA, DoRA or VeRA)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG).exists() or not (adapter_dir / WEIGHTS).exists():
        raise CheckpointError(f"{adapter_dir} is not a PEFT adapter: expected {CONFIG} and {WEIGHTS}")
    config = json.loads((adapter_dir / CONFIG).read_text())
    if config.get("peft_type") not in ("LORA", "VERA"):
        raise LowraxError(f"{adapter_dir}: adapter type {config.get('peft_type')!r} is not supported by load_peft "
                          "(supported: LORA, with or without use_dora, and VERA)")
    if config.get("peft_type") == "LORA" and str(config.get("init_lora_weights")).startswith("pissa"):
        raise LowraxError(f"{adapter_dir}: a PiSSA adapter saved without conversion only fits PEFT's residual model; "
                          "save it from PEFT with path_initial_model_for_weight_conversion to get plain LoRA")
    tensors = load_file(str(adapter_dir / WEIGHTS))
    tensors = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in tensors.items()}
    modules = linear_modules(params)
    out = jax.tree.map(lambda x: x, params, is_leaf=is_node)
    if config["peft_type"] == "VERA":
        from lowrax.peft_vera import load_vera

        load_vera(out, tensors, config, modules, adapter_dtype)
        tensors = {k: v for k, v in tensors.items() if ".vera_lambda_" not in k and not k.startswith("base_model.vera_")}
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
        node = LoraKernel(base=base, a=jnp.asarray(a_t.T, adapter_dtype), b=jnp.asarray(b_t.T, adapter_dtype),
                          scale=lora_scale(alpha, r, use_rslora), dropout=float(config.get("lora_dropout", 0.0)))
        if config.get("use_dora"):
            node = _dora_node(node, tensors, name, d_out)
        tables.set_path(out, path, node)
    rest = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k and not k.endswith(".lora_magnitude_vector")]
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


def _dora_node(node: LoraKernel, tensors: dict, name: str, d_out: int) -> DoraKernel:
    key = f"{name}.lora_magnitude_vector"
    if key not in tensors:
        raise CheckpointError(f"a DoRA adapter (use_dora: true) needs {PREFIX}{key}, which is missing")
    magnitude = tensors[key]
    if magnitude.shape != (d_out,):
        raise CheckpointError(f"adapter tensor {PREFIX}{key} has shape {magnitude.shape}, expected ({d_out},)")
    return DoraKernel(base=node.base, a=node.a, b=node.b, magnitude=jnp.asarray(magnitude, node.a.dtype),
                      scale=node.scale, dropout=node.dropout)
