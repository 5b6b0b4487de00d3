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



import jax.numpy as jnp
import numpy as np

from lowrax.adapters.lora.config import LoraConfig
from lowrax.adapters.lora.vera import DEFAULT_D_INITIAL, SHARED, VeraKernel, check_fits
from lowrax.adapters.registry import PeftFormat, register_peft_format
from lowrax.adapters.targets import targeting_from_peft
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, fan_in_fan_out, torch_layout

SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"


def write(nodes: dict[str, VeraKernel], params: dict, *, model=None, **_unused) -> tuple[dict, dict]:
    shared = params[SHARED]
    tensors = {SHARED_A: torch_layout(shared["a"]), SHARED_B: torch_layout(shared["b"])}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.vera_lambda_b"] = np.asarray(node.lambda_b, np.float32)
        tensors[f"{PREFIX}{name}.vera_lambda_d"] = np.asarray(node.lambda_d, np.float32)
    return tensors, {
        "r": int({n.rank for n in nodes.values()}.pop()),
        "projection_prng_key": 0,
        "save_projection": True,
        "vera_dropout": float(next(iter(nodes.values())).dropout),
        "d_initial": DEFAULT_D_INITIAL,
        "fan_in_fan_out": fan_in_fan_out(model),
        "bias": "none",
        "init_weights": True,
    }


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    if SHARED_A not in tensors or SHARED_B not in tensors:
        raise CheckpointError(
            f"VeRA adapter without {SHARED_A} / {SHARED_B}: it was saved with save_projection=false, and PEFT's "
            "projections come from torch's random generator, which lowrax cannot reproduce; save it with save_projection=true")
    r = int(config["r"])
    shared = {"a": jnp.asarray(tensors[SHARED_A].T, adapter_dtype), "b": jnp.asarray(tensors[SHARED_B].T, adapter_dtype)}
    names = sorted({k.rsplit(".vera_lambda_", 1)[0] for k in tensors if ".vera_lambda_" in k})
    if not names:
        raise CheckpointError("VeRA adapter holds no vera_lambda_b / vera_lambda_d tensors")
    nodes, used = {}, {SHARED_A, SHARED_B}
    for name in names:
        if name not in bases:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}.vera_lambda_b targets {name!r}, which is not a linear module of this model")
        d_in, d_out = bases[name].shape
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
            used.add(key)
        nodes[name] = VeraKernel(base=bases[name], dropout=float(config.get("vera_dropout", 0.0)), **vectors)
    return nodes, {SHARED: shared}, used


def to_config(config: dict) -> tuple[str, LoraConfig]:
    return "lora", LoraConfig(r=int(config["r"]), variant="vera", dropout=float(config.get("vera_dropout", 0.0)),
                              **targeting_from_peft(config))


register_peft_format(PeftFormat(peft_type="VERA", write=write, read=read, to_config=to_config))
