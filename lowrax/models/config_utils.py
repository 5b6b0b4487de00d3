"""Reading fields out of an HF `config.json` dict across transformers versions."""

from __future__ import annotations

from typing import Any

from lowrax.errors import LowraxError

_MISSING = object()


def field(hf: dict, *names: str, default: Any = _MISSING) -> Any:
    """The first of `names` present in the HF config dict, else `default`.

    Raises a ValueError naming the field when it is required and absent.
    """
    for name in names:
        if name in hf and hf[name] is not None:
            return hf[name]
    if default is _MISSING:
        raise LowraxError(f"config.json has no {names[0]!r} field (model_type {hf.get('model_type')!r})")
    return default


def head_labels(hf: dict, num_labels: int | None, architecture_suffix: str) -> int | None:
    """The classes of a checkpoint's classification head: `num_labels` when given, else id2label's size
    (or num_labels) when config.json's architectures end in `architecture_suffix`, else None (no head)."""
    if num_labels is None and any(a.endswith(architecture_suffix) for a in hf.get("architectures") or []):
        return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))
    return num_labels


def rope_settings(hf: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from either `rope_theta`/`rope_scaling` (transformers 4)
    or `rope_parameters` (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or default_theta)
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling
