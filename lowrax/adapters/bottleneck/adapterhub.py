"""AdapterHub's adapter directory (`adapters` 1.x `save_adapter(..., use_safetensors=True)`), both ways.

    adapter_config.json      {"config": {BnConfig fields}, "hidden_size", "model_class", "model_name",
                             "model_type", "name", "version"}
    adapter.safetensors      <site>.adapters.<name>.adapter_down.0.weight (m, hidden), .bias (m),
                             adapter_up.weight (hidden, m), .bias, scaling, adapter_norm_after.*, gate.*
    model_head.safetensors   a classifier trained with the adapter (classifier.weight, ...), and
    head_config.json         AdapterHub's static-head record

`<site>` is the module AdapterHub hooks (`model.layers.0.attention_adapters`,
`bert.encoder.layer.0.output`). A pickled `pytorch_adapter.bin` is refused, never unpickled.
A causal LM's `model_head.safetensors` is its frozen LM head, which AdapterHub saves beside
the adapter: lowrax reads its base's own and leaves that file alone.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from lowrax.adapters.bottleneck.config import BottleneckConfig
from lowrax.adapters.bottleneck.build import bottleneck_size, sites, site_path, wiring_of
from lowrax.adapters.bottleneck.node import BottleneckAdapter
from lowrax.core.node import is_node
from lowrax.adapters.registry import PeftFormat, register_peft_format
from lowrax.errors import CheckpointError, LowraxError
from lowrax.core import tables
from lowrax.core.atomic import write_directory
from lowrax.io.safetensors_dir import write_tensor_file
from lowrax.peft.format import put_fully_trained

VERSION = "adapters.1.3.0"  # the release whose format this is
CONFIG, WEIGHTS, HEAD_WEIGHTS, HEAD_CONFIG = "adapter_config.json", "adapter.safetensors", "model_head.safetensors", "head_config.json"
DEFAULT_NAME = "lowrax"
# field -> (AdapterHub parameter, transposed): torch Linear weights are (out, in)
PARAMS = {"down_kernel": ("adapter_down.0.weight", True), "down_bias": ("adapter_down.0.bias", False),
          "up_kernel": ("adapter_up.weight", True), "up_bias": ("adapter_up.bias", False),
          "scale": ("scaling", False), "norm_scale": ("adapter_norm_after.weight", False),
          "norm_bias": ("adapter_norm_after.bias", False), "gate_kernel": ("gate.weight", True),
          "gate_bias": ("gate.bias", False)}
# BnConfig fields lowrax does not model, at the values it supports (what AdapterHub writes for them)
FIXED = {"cross_adapter": False, "factorized_phm_W": True, "factorized_phm_rule": False,
         "hypercomplex_nonlinearity": "glorot-uniform", "init_weights_seed": None, "inv_adapter": None,
         "inv_adapter_reduction_factor": None, "learn_phm": True, "ln_before": False, "phm_bias": True,
         "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False, "phm_rank": 1,
         "shared_W_phm": False, "shared_phm_rule": True, "stochastic_depth": 0.0}
REFUSED = {"ln_before": "a LayerNorm before the bottleneck (AdapterHub cannot save it as safetensors either)",
           "phm_layer": "PHM (hypercomplex) projections", "inv_adapter": "invertible adapters",
           "cross_adapter": "cross-attention adapters", "stochastic_depth": "stochastic depth"}
CLASS_PREFIX = {"llama": "Llama", "gpt2": "GPT2", "bert": "Bert", "roberta": "Roberta"}


def recognises(config: dict) -> bool:
    return str(config.get("version", "")).startswith("adapters.") and isinstance(config.get("config"), dict)


def model_class(model) -> str:
    prefix = CLASS_PREFIX.get(model.model_type, model.model_type.capitalize())
    if model.is_causal_lm:
        return "GPT2LMHeadModel" if model.model_type == "gpt2" else f"{prefix}ForCausalLM"
    return f"{prefix}ForSequenceClassification" if getattr(model.config, "num_labels", None) else f"{prefix}Model"


def config_from_adapterhub(config: dict) -> BottleneckConfig:
    bn = config["config"]
    if bn.get("architecture", "bottleneck") not in (None, "bottleneck"):
        raise CheckpointError(f"this AdapterHub adapter is {bn.get('architecture')!r}, not a bottleneck adapter")
    for key, what in REFUSED.items():
        if bn.get(key) not in (None, False, 0, 0.0):
            raise CheckpointError(f"this AdapterHub adapter uses {what} ({key}={bn[key]!r}), which lowrax does not "
                                  "implement")
    fields = {k: bn[k] for k in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity",
                                 "original_ln_before", "original_ln_after", "residual_before_ln",
                                 "adapter_residual_before_ln", "ln_after", "is_parallel", "scaling", "use_gating",
                                 "dropout", "init_weights") if k in bn}
    try:
        return BottleneckConfig(**fields, leave_out=tuple(bn.get("leave_out") or ()))
    except LowraxError as e:
        raise CheckpointError(f"adapter_config.json of this AdapterHub adapter: {e}") from None


def _site_nodes(params) -> dict[str, BottleneckAdapter]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]:
        if isinstance(leaf, BottleneckAdapter):
            keys = [str(p.key) for p in path]
            out[".".join(keys[:-1])] = leaf  # the site: the path less its final `adapters`
    return out


def _reduction_factor(nodes: dict, layers: dict, hidden: int):
    """AdapterHub's reduction_factor giving each layer's bottleneck width (a mapping when they differ)."""
    def factor(m):
        f = hidden / m
        return int(f) if float(f).is_integer() else f

    per_layer = {layers[name]: factor(n.down_kernel.shape[1]) for name, n in nodes.items()}
    common = Counter(per_layer.values()).most_common(1)[0][0]
    if all(f == common for f in per_layer.values()):
        return common
    return {**{str(layer): f for layer, f in sorted(per_layer.items()) if f != common}, "default": common}


def _bn_config(nodes: dict, model) -> dict:
    all_sites = model.bottleneck_sites()
    first = next(iter(nodes.values()))
    if any(n.wiring != first.wiring or n.dropout != first.dropout for n in nodes.values()):
        raise LowraxError("AdapterHub's config holds one wiring for every site; these bottleneck adapters differ")
    where = {all_sites[name][0] for name in nodes}
    layers_with = {all_sites[name][1] for name in nodes}
    expected = {name for name, (loc, layer) in all_sites.items() if loc in where and layer in layers_with}
    if expected != set(nodes):
        raise LowraxError("AdapterHub places an adapter at every chosen location of every layer not left out; "
                          f"these adapters leave out {sorted(expected - set(nodes))[:3]}")
    w = first.wiring
    scaling = w.scaling if first.scale is None else ("learned" if first.scale.shape == (1,) else "channel")
    return FIXED | {
        "adapter_residual_before_ln": w.adapter_residual_before_ln, "dropout": first.dropout,
        "init_weights": w.init_weights, "is_parallel": w.is_parallel,
        "leave_out": sorted({layer for _, layer in all_sites.values()} - layers_with),
        "ln_after": first.norm_scale is not None, "mh_adapter": "mh_adapter" in where,
        "non_linearity": w.non_linearity, "original_ln_after": w.original_ln_after,
        "original_ln_before": w.original_ln_before, "output_adapter": "output_adapter" in where,
        "reduction_factor": _reduction_factor(nodes, {n: all_sites[n][1] for n in nodes}, model.config.hidden_size),
        "residual_before_ln": w.residual_before_ln, "scaling": scaling, "use_gating": first.gate_kernel is not None,
    }


def save_directory(params, nodes, out_dir, model, *, overwrite: bool = False, base_model: str | None = None,
                   fully_trained: dict | None = None, name: str = DEFAULT_NAME, **_unused) -> Path:
    """Write the bottleneck adapters of `params` (and a trained classifier, `fully_trained`: HF key ->
    torch-layout array, as `save_peft` collects it) as AdapterHub saves them."""
    if model is None:
        raise LowraxError("saving bottleneck adapters needs the model (its sites and class): save_peft(params, dir, model)")
    site_nodes = _site_nodes(params)
    tensors = {}
    for site, node in site_nodes.items():
        for field, (param, transposed) in PARAMS.items():
            value = getattr(node, field)
            if value is not None:
                array = np.asarray(value, np.float32)
                tensors[f"{site}.adapters.{name}.{param}"] = np.ascontiguousarray(array.T if transposed else array)
    config = {"config": _bn_config(site_nodes, model), "hidden_size": model.config.hidden_size,
              "model_class": model_class(model), "model_name": base_model or "", "model_type": model.model_type,
              "name": name, "version": VERSION}
    head = fully_trained or {}

    def fill(staging: Path) -> None:
        write_tensor_file(tensors, staging / WEIGHTS)
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if head:
            write_tensor_file(head, staging / HEAD_WEIGHTS)
            labels = model.config.num_labels
            (staging / HEAD_CONFIG).write_text(json.dumps(
                {"config": None, "hidden_size": model.config.hidden_size,
                 "label2id": {f"LABEL_{i}": i for i in range(labels)}, "model_class": model_class(model),
                 "model_name": base_model or "", "model_type": model.model_type, "name": None, "num_labels": labels,
                 "version": VERSION}, indent=2, sort_keys=True) + "\n")

    return write_directory(out_dir, fill, overwrite)


def load_directory(params, adapter_dir, model, adapter_dtype=jnp.float32):
    """`params` with the AdapterHub adapter in `adapter_dir` at its sites (and its classifier)."""
    adapter_dir = Path(adapter_dir)
    if model is None:
        raise LowraxError("loading an AdapterHub adapter needs the model: load_peft(params, dir, model)")
    if not (adapter_dir / WEIGHTS).exists():
        pickled = " (it holds a pickled pytorch_adapter.bin, which lowrax never unpickles: re-save it with " \
                  "save_adapter(..., use_safetensors=True))" if (adapter_dir / "pytorch_adapter.bin").exists() else ""
        raise CheckpointError(f"{adapter_dir} has no {WEIGHTS}{pickled}")
    config = json.loads((adapter_dir / CONFIG).read_text())
    if config.get("model_type") != model.model_type or config.get("hidden_size") != model.config.hidden_size:
        raise CheckpointError(f"{adapter_dir}: this adapter was saved for a {config.get('model_type')} model of hidden "
                              f"size {config.get('hidden_size')}, not this {model.model_type} of {model.config.hidden_size}")
    try:
        cfg = config_from_adapterhub(config)
    except CheckpointError as e:
        raise CheckpointError(f"{adapter_dir}: {e}") from None
    tensors, name = load_file(str(adapter_dir / WEIGHTS)), config.get("name")
    out = jax.tree.map(lambda x: x, params, is_leaf=is_node)
    hidden, wiring, used = model.config.hidden_size, wiring_of(cfg), set()
    for site, (_, layer) in sites(model, cfg).items():
        m = bottleneck_size(hidden, cfg.factor_for(layer))
        shapes = {"down_kernel": (hidden, m), "down_bias": (m,), "up_kernel": (m, hidden), "up_bias": (hidden,),
                  "scale": {"learned": (1,), "channel": (hidden,)}.get(cfg.scaling),
                  "norm_scale": (hidden,) if cfg.ln_after else None, "norm_bias": (hidden,) if cfg.ln_after else None,
                  "gate_kernel": (hidden, 1) if cfg.use_gating else None, "gate_bias": (1,) if cfg.use_gating else None}
        arrays = {}
        for field, shape in shapes.items():
            if shape is None:
                continue
            param, transposed = PARAMS[field]
            key = f"{site}.adapters.{name}.{param}"
            if key not in tensors:
                raise CheckpointError(f"{adapter_dir}: {WEIGHTS} has no {key}, which its config implies")
            value = tensors[key].T if transposed else tensors[key]
            if tuple(value.shape) != shape:
                raise CheckpointError(f"{adapter_dir}: {key} has shape {tensors[key].shape}, expected "
                                      f"{shape[::-1] if transposed else shape}")
            arrays[field] = jnp.asarray(np.asarray(value, np.float32), adapter_dtype)
            used.add(key)
        tables.set_path(out, site_path(site), BottleneckAdapter(**arrays, wiring=wiring, dropout=float(cfg.dropout)))
    if set(tensors) - used:
        raise CheckpointError(f"{adapter_dir}: tensors {sorted(set(tensors) - used)[:3]} fit no site this config selects")
    if (adapter_dir / HEAD_WEIGHTS).exists() and not model.is_causal_lm:
        put_fully_trained(out, load_file(str(adapter_dir / HEAD_WEIGHTS)), model,
                          lambda k: f"{adapter_dir}: head tensor {k}")
    return out


def to_config(config: dict) -> tuple[str, BottleneckConfig]:
    return "bottleneck", config_from_adapterhub(config)


def _whole_directories(*_args, **_kwargs):
    raise LowraxError("AdapterHub adapters are whole directories: use lowrax.save_peft / lowrax.load_peft")


register_peft_format(PeftFormat(peft_type="BOTTLENECK", write=_whole_directories, read=_whole_directories,
                                to_config=to_config, save_directory=save_directory, load_directory=load_directory,
                                recognises=recognises))
