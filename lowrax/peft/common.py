"""What every PEFT adapter format shares: the key prefix, `target_modules`, the common config fields.

Tensor keys are PEFT's (`base_model.model.<module>.<name>`), in torch layout:
a Linear weight is (out, in), the transpose of lowrax's [in, out] kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowrax.errors import CheckpointError, LowraxError

PREFIX = "base_model.model."
OMIT = object()  # a format's config value meaning "leave this common field out" (PEFT rejects it there)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def target_spec(nodes: dict[str, Any], model, existing: set[str] | None = None) -> Any:
    """PEFT's `target_modules` for exactly these modules: a suffix list when it selects
    exactly them among the `existing` candidates (default: the model's linear modules),
    else an exact regex of their names."""
    suffixes = sorted({name.split(".")[-1] for name in nodes})
    if existing is None and model is not None:
        existing = {".".join(t.path[:-1]) for t in model.tensors() if t.path[-1] == "kernel"}
    if existing is not None:
        if {n for n in existing if n.split(".")[-1] in suffixes} != set(nodes):
            return "^(" + "|".join(sorted(map(lambda s: s.replace(".", r"\."), nodes))) + ")$"
    return suffixes


def fan_in_fan_out(model) -> bool:
    """PEFT wants `fan_in_fan_out: true` on GPT-2, whose Conv1D layers store (in, out) weights."""
    return getattr(model, "model_type", None) == "gpt2"


def common_config(peft_type: str, nodes: dict[str, Any], model, modules_to_save: list[str],
                  base_model: str | None) -> dict:
    """The fields every `adapter_config.json` carries, whatever the method."""
    return {
        "peft_type": peft_type,
        "task_type": task_type(model),
        "base_model_name_or_path": base_model,
        "target_modules": target_spec(nodes, model),
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
    }


def torch_layout(kernel_like) -> np.ndarray:
    """A lowrax [in, out]-style matrix as the contiguous float32 torch (out, in) array."""
    return np.ascontiguousarray(np.asarray(kernel_like, np.float32).T)


def check_shape(name: str, key: str, tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"adapter tensor {PREFIX}{name}.{key} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(expected)} for this module")


def task_type(model) -> str | None:
    """PEFT's task_type for the model's kind (a causal LM when the model is not given). None for an image
    classifier, as PEFT's image-classification guide leaves it: PEFT's SEQ_CLS wrapper would make the
    classifier a trained module whether or not the adapter trained it."""
    if getattr(model, "is_image_model", False):
        return None
    if getattr(model, "is_seq2seq", False):
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM" if getattr(model, "is_causal_lm", True) else "SEQ_CLS"


def refuse_conv1d(model, method: str) -> None:
    """A method PEFT implements for nn.Linear (and convolutions) only cannot be written for GPT-2, whose
    layers are transformers' Conv1D."""
    if getattr(model, "model_type", None) == "gpt2":
        raise LowraxError(f"PEFT's {method} does not support GPT-2 (its Conv1D layers are neither nn.Linear nor a "
                          f"convolution), so a {method} adapter on GPT-2 cannot be written in PEFT's format; "
                          "it trains and merges in lowrax")


def adapted_modules(tensors: dict, suffix: str, bases: dict, method: str) -> list[str]:
    """The adapted modules of a PEFT file (keys without PEFT's prefix): those with a `suffix` tensor,
    each a module of this model, or a CheckpointError that names the problem."""
    names = sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix))
    if not names:
        raise CheckpointError(f"{method} adapter holds no {suffix} tensors")
    for name in names:
        if name not in bases:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}{suffix} targets {name!r}, which is not a linear "
                                  "module of this model")
    return names


def adapter_tensor(tensors: dict, name: str, field: str, expected: tuple[int, ...], method: str) -> np.ndarray:
    """One adapter tensor of a module as float32 numpy, present and of the expected (torch) shape."""
    key = f"{name}.{field}"
    if key not in tensors:
        raise CheckpointError(f"{method} adapter lacks {PREFIX}{key}")
    check_shape(name, field, tensors[key], expected)
    return np.asarray(tensors[key], np.float32)


def value_and_pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A per-module setting as PEFT's config holds it: the most common value (the smallest on a tie)
    and a pattern of the module names that differ from it."""
    counts = list(values.values())
    common = max(sorted(set(counts)), key=counts.count)
    return common, {name: v for name, v in values.items() if v != common}


def one_setting(values, method: str, what: str):
    """The one value a setting PEFT keeps per adapter (not per layer) takes across the layers, or an error."""
    values = set(values)
    if len(values) != 1:
        raise LowraxError(f"PEFT's {method} format has one {what} per adapter; these layers use {sorted(values)}")
    return values.pop()
