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


def rope_settings(hf: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from either `rope_theta`/`rope_scaling` (transformers 4)
    or `rope_parameters` (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or default_theta)
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling
