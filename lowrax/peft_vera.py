"""PEFT's VeRA adapter format (`peft_type: VERA`, `save_projection: true`).

    base_model.vera_A                              (r, max_in)   the shared projections, torch layout
    base_model.vera_B                              (max_out, r)
    base_model.model.<module>.vera_lambda_b        (out,)
    base_model.model.<module>.vera_lambda_d        (r,)

lowrax stores the pair once as params["vera_shared"] = {"a": [max_in, r], "b": [r, max_out]}.
Without `save_projection` PEFT regenerates the projections from torch's random
generator, which lowrax cannot reproduce: such adapters are refused.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from lowrax.errors import CheckpointError, LowraxError
from lowrax.io import tables
from lowrax.variants import VeraKernel
from lowrax.variants.vera import DEFAULT_D_INITIAL, SHARED, check_fits

PREFIX = "base_model.model."
SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"


def vera_tensors_and_config(params: dict, nodes: dict[str, VeraKernel], model, modules_to_save: list[str],
                            base_model: str | None) -> tuple[dict, dict]:
    from lowrax.peft_format import target_spec

    shared = params[SHARED]
    tensors = {SHARED_A: np.ascontiguousarray(np.asarray(shared["a"], np.float32).T),
               SHARED_B: np.ascontiguousarray(np.asarray(shared["b"], np.float32).T)}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.vera_lambda_b"] = np.asarray(node.lambda_b, np.float32)
        tensors[f"{PREFIX}{name}.vera_lambda_d"] = np.asarray(node.lambda_d, np.float32)
    ranks = {n.rank for n in nodes.values()}
    config = {
        "peft_type": "VERA",
        "task_type": "CAUSAL_LM" if getattr(model, "is_causal_lm", True) else "SEQ_CLS",
        "base_model_name_or_path": base_model,
        "r": int(ranks.pop()),
        "target_modules": target_spec(nodes, model),
        "projection_prng_key": 0,
        "save_projection": True,
        "vera_dropout": float(next(iter(nodes.values())).dropout),
        "d_initial": DEFAULT_D_INITIAL,
        "fan_in_fan_out": getattr(model, "model_type", None) == "gpt2",
        "bias": "none",
        "modules_to_save": modules_to_save or None,
        "init_weights": True,
        "inference_mode": True,
    }
    return tensors, config


def load_vera(out: dict, tensors: dict, config: dict, modules: dict, adapter_dtype) -> None:
    """Add the VeRA adapter in `tensors` (PEFT keys, model prefix removed) to the tree `out`."""
    if SHARED_A not in tensors or SHARED_B not in tensors:
        raise CheckpointError(
            f"VeRA adapter without {SHARED_A} / {SHARED_B}: it was saved with save_projection=false, and PEFT's "
            "projections come from torch's random generator, which lowrax cannot reproduce; save it with save_projection=true")
    r = int(config["r"])
    shared = {"a": jnp.asarray(tensors[SHARED_A].T, adapter_dtype), "b": jnp.asarray(tensors[SHARED_B].T, adapter_dtype)}
    names = sorted({k.rsplit(".vera_lambda_", 1)[0] for k in tensors if ".vera_lambda_" in k})
    if not names:
        raise CheckpointError("VeRA adapter holds no vera_lambda_b / vera_lambda_d tensors")
    for name in names:
        if name not in modules:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}.vera_lambda_b targets {name!r}, which is not a linear module of this model")
        base = tables.get_path(out, modules[name])
        d_in, d_out = base.shape
        try:
            check_fits(shared, name, d_in, d_out, r)
        except LowraxError as e:
            raise CheckpointError(str(e)) from None
        vectors = {}
        for field, shape in (("lambda_b", (d_out,)), ("lambda_d", (r,))):
            key = f"{name}.vera_{field}"
            if key not in tensors:
                raise CheckpointError(f"VeRA adapter has no {PREFIX}{key}")
            if tensors[key].shape != shape:
                raise CheckpointError(f"adapter tensor {PREFIX}{key} has shape {tensors[key].shape}, expected {shape}")
            vectors[field] = jnp.asarray(tensors[key], adapter_dtype)
        tables.set_path(out, modules[name], VeraKernel(base=base, dropout=float(config.get("vera_dropout", 0.0)), **vectors))
    out[SHARED] = shared
