"""PEFT's ADALORA format.

    base_model.model.<module>.lora_A   (r_i, in)    P, transposed, kept triplets only
    base_model.model.<module>.lora_E   (r_i, 1)     the singular values of the kept triplets
    base_model.model.<module>.lora_B   (out, r_i)   Q, transposed, kept triplets only

(no `.weight` suffix: PEFT stores them as bare parameters). Once the allocator has
pruned, the config's `rank_pattern` maps `<module>.lora_E` to init_r booleans (kept or
not) and the tensors hold the kept triplets only, as PEFT's `save_pretrained` writes
them; reading puts them back at their positions among init_r (pruned ones zero), so
lowrax keeps fixed shapes and a re-export writes the same pattern.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from lowrax.adapters.adalora.config import AdaLoraConfig
from lowrax.adapters.adalora.node import RANKNUM_EPS, AdaLoraKernel
from lowrax.adapters.adalora.build import adalora_scale, new_node, schedule_of
from lowrax.adapters.registry import PeftFormat, register_peft_format
from lowrax.adapters.targets import targeting_from_peft
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, check_shape, fan_in_fan_out


def write(nodes: dict[str, AdaLoraKernel], params, *, model=None, **_unused) -> tuple[dict, dict]:
    first = next(iter(nodes.values()))
    if any((n.rank, n.scale, n.dropout, n.schedule) != (first.rank, first.scale, first.dropout, first.schedule)
           for n in nodes.values()):
        raise LowraxError("PEFT's AdaLoRA config holds one init_r, alpha, dropout and schedule for every module; "
                          "these AdaLoRA nodes differ, so they cannot be written as one PEFT adapter")
    kept = {name: np.asarray(n.kept) > 0 for name, n in nodes.items()}
    pruned = not all(k.all() for k in kept.values())
    tensors = {}
    for name, node in nodes.items():
        keep = kept[name] if pruned else slice(None)
        tensors[f"{PREFIX}{name}.lora_A"] = np.ascontiguousarray(np.asarray(node.a, np.float32).T[keep])
        tensors[f"{PREFIX}{name}.lora_E"] = np.ascontiguousarray(np.asarray(node.e, np.float32)[keep][:, None])
        tensors[f"{PREFIX}{name}.lora_B"] = np.ascontiguousarray(np.asarray(node.b, np.float32)[keep].T)
    s = first.schedule
    return tensors, {
        "init_r": first.rank, "target_r": s.target_r, "lora_alpha": round(first.scale * (first.rank + RANKNUM_EPS), 6),
        "lora_dropout": first.dropout, "tinit": s.tinit, "tfinal": s.tfinal, "deltaT": s.deltaT, "beta1": s.beta1,
        "beta2": s.beta2, "orth_reg_weight": s.orth_reg_weight, "total_step": s.total_step,
        "rank_pattern": {f"{name}.lora_E": k.tolist() for name, k in kept.items()} if pruned else None,
        "fan_in_fan_out": fan_in_fan_out(model), "bias": "none", "init_lora_weights": True, "use_dora": False,
    }


def config_from_peft(config: dict) -> AdaLoraConfig:
    if config.get("use_dora"):
        raise CheckpointError("an AdaLoRA config with use_dora: true is invalid (PEFT refuses it too)")
    try:
        return AdaLoraConfig(init_r=int(config.get("init_r", 12)), target_r=int(config.get("target_r", 8)),
                             alpha=float(config.get("lora_alpha", 8)), dropout=float(config.get("lora_dropout") or 0.0),
                             tinit=int(config.get("tinit", 0)), tfinal=int(config.get("tfinal", 0)),
                             deltaT=int(config.get("deltaT", 1)), beta1=float(config.get("beta1", 0.85)),
                             beta2=float(config.get("beta2", 0.85)),
                             orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
                             total_step=int(config["total_step"]) if config.get("total_step") else None)
    except LowraxError as e:
        raise CheckpointError(f"adapter_config.json of this AdaLoRA adapter: {e}") from None


def _kept_of(name: str, pattern: dict, init_r: int, rank: int) -> np.ndarray:
    """Which of init_r positions the file's `rank` triplets occupy."""
    mask = pattern.get(f"{name}.lora_E")
    if mask is None:
        if rank != init_r:
            raise CheckpointError(f"{PREFIX}{name}.lora_E holds {rank} triplets but init_r is {init_r} and the config "
                                  f"has no rank_pattern entry {name}.lora_E saying which were kept")
        return np.ones(init_r, bool)
    mask = np.asarray(mask, bool)
    if mask.shape != (init_r,) or int(mask.sum()) != rank:
        raise CheckpointError(f"rank_pattern[{name + '.lora_E'!r}] must hold init_r={init_r} booleans with one True "
                              f"per stored triplet ({rank}); it holds {mask.size} with {int(mask.sum())} True")
    return mask


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    cfg = config_from_peft(config)
    schedule = schedule_of(cfg) if cfg.total_step else None
    if schedule is None:
        raise CheckpointError("an AdaLoRA adapter_config.json needs total_step > 0 (PEFT requires it too)")
    pattern = config.get("rank_pattern") or {}
    names = sorted(k[: -len(".lora_A")] for k in tensors if k.endswith(".lora_A"))
    if not names:
        raise CheckpointError("AdaLoRA adapter holds no .lora_A tensors")
    nodes, used = {}, set()
    for name in names:
        if name not in bases:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}.lora_A targets {name!r}, which is not a linear "
                                  "module of this model")
        for part in ("lora_E", "lora_B"):
            if f"{name}.{part}" not in tensors:
                raise CheckpointError(f"adapter has {PREFIX}{name}.lora_A but no {PREFIX}{name}.{part}")
        d_in, d_out = bases[name].shape
        rank = tensors[f"{name}.lora_A"].shape[0]
        check_shape(name, "lora_A", tensors[f"{name}.lora_A"], (rank, d_in))
        check_shape(name, "lora_E", tensors[f"{name}.lora_E"], (rank, 1))
        check_shape(name, "lora_B", tensors[f"{name}.lora_B"], (d_out, rank))
        kept = _kept_of(name, pattern, cfg.init_r, rank)
        a = np.zeros((d_in, cfg.init_r), np.float32)
        e = np.zeros((cfg.init_r,), np.float32)
        b = np.zeros((cfg.init_r, d_out), np.float32)
        a[:, kept] = np.asarray(tensors[f"{name}.lora_A"], np.float32).T
        e[kept] = np.asarray(tensors[f"{name}.lora_E"], np.float32)[:, 0]
        b[kept] = np.asarray(tensors[f"{name}.lora_B"], np.float32).T
        nodes[name] = new_node(bases[name], jnp.asarray(a, adapter_dtype), jnp.asarray(e, adapter_dtype),
                               jnp.asarray(b, adapter_dtype), kept, scale=adalora_scale(cfg.alpha, cfg.init_r),
                               dropout=cfg.dropout, schedule=schedule)
        used |= {f"{name}.lora_A", f"{name}.lora_E", f"{name}.lora_B"}
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, AdaLoraConfig]:
    return "adalora", dataclasses.replace(config_from_peft(config), **targeting_from_peft(config))


register_peft_format(PeftFormat(peft_type="ADALORA", write=write, read=read, to_config=to_config))
