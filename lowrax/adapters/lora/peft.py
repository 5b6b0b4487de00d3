"""PEFT's LORA format for the LoRA family (`peft_type: LORA`).

    base_model.model.<module>.lora_A.weight          (r, in)    lowrax's a [in, r], transposed
    base_model.model.<module>.lora_B.weight          (out, r)   lowrax's b [r, out], transposed
    base_model.model.<module>.lora_magnitude_vector  (out,)     DoRA only (`use_dora: true`)

LoRA-FA and rsLoRA are plain LoRA (rsLoRA with `use_rslora`). Adapters over a
rewritten base (the PiSSA, OLoRA, CorDA and LoRA-GA inits) and Delta-LoRA are
written as the plain rank-2r LoRA over the original base that gives the same
weights (PEFT's conversion). A MiCA adapter keeps `init_lora_weights: mica`, so
PEFT keeps its b frozen.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowrax.adapters.lora import delta_lora, residual
from lowrax.adapters.lora.config import LoraConfig
from lowrax.adapters.lora.dora import DoraKernel
from lowrax.adapters.lora.node import LoraKernel, lora_scale
from lowrax.adapters import trainable_tokens
from lowrax.adapters.registry import PeftFormat, register_peft_format
from lowrax.adapters.targets import pattern_value, targeting_from_peft
from lowrax.adapters.wrap import adapter_nodes
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, fan_in_fan_out, torch_layout


def _as_plain_lora(nodes: dict[str, Any], initial: Any) -> dict[str, Any]:
    """The nodes in PEFT's LoRA terms: Delta-LoRA and adapters over a rewritten base become
    equivalent plain LoRA."""
    out = {}
    initial_nodes = adapter_nodes(initial) if initial is not None else {}
    for name, node in nodes.items():
        if isinstance(node, delta_lora.DeltaLoraKernel):
            node = delta_lora.as_plain_lora(node)
        elif isinstance(node, LoraKernel) and node.residual_base:
            if name not in initial_nodes:
                raise LowraxError(f"the adapter at {name} (over a rewritten base: PiSSA, OLoRA, CorDA or LoRA-GA init) "
                                  "has no counterpart in `initial`; pass the tree right after wrap "
                                  "(save_peft(..., initial=params_right_after_wrap))")
            node = residual.to_plain_lora(node, initial_nodes[name], node.base)
        out[name] = node
    return out


def write(nodes: dict[str, Any], params: Any, *, model=None, initial=None, use_rslora: bool | None = None,
          **_unused) -> tuple[dict, dict]:
    kinds = {type(n).__name__ for n in nodes.values()}
    if "DoraKernel" in kinds and len(kinds) > 1:
        raise LowraxError(f"one PEFT adapter holds one method; these params mix {', '.join(sorted(kinds))}")
    if use_rslora is None:
        use_rslora = any(n.rslora for n in nodes.values())
    nodes = _as_plain_lora(nodes, initial)
    tensors = {}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = torch_layout(node.a)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = torch_layout(node.b)
        if isinstance(node, DoraKernel):
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.asarray(node.magnitude, np.float32)

    def alpha_of(node):
        return round(node.scale * (math.sqrt(node.rank) if use_rslora else node.rank), 6)

    r = Counter(n.rank for n in nodes.values()).most_common(1)[0][0]
    alpha = Counter(alpha_of(n) for n in nodes.values()).most_common(1)[0][0]
    return tensors, {
        "r": int(r),
        "lora_alpha": float(alpha),
        "lora_dropout": float(Counter(n.dropout for n in nodes.values()).most_common(1)[0][0]),
        "rank_pattern": {name: n.rank for name, n in nodes.items() if n.rank != r},
        "alpha_pattern": {name: alpha_of(n) for name, n in nodes.items() if alpha_of(n) != alpha},
        "use_rslora": bool(use_rslora),
        "fan_in_fan_out": fan_in_fan_out(model),
        "bias": "none",
        # MiCA's b stays frozen in PEFT only when its config says mica (PEFT then redoes the SVD, and
        # the file's factors replace it); every other start is plain LoRA over the weights PEFT loads
        "init_lora_weights": "mica" if all(not getattr(n, "train_b", True) for n in nodes.values()) else True,
        "use_dora": kinds == {"DoraKernel"},
    }


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    init = str(config.get("init_lora_weights"))
    if init.startswith(("pissa", "olora", "corda", "lora_ga")):
        raise LowraxError(f"a {init} adapter saved without conversion only fits the base its init rewrote; save "
                          "it from PEFT with path_initial_model_for_weight_conversion to get plain LoRA over the "
                          "original weights")
    use_rslora = bool(config.get("use_rslora", False))
    nodes, used = {}, set()
    for name in sorted({k.rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k}):
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if name not in bases:
            raise CheckpointError(f"adapter tensor {PREFIX}{a_key} targets {name!r}, which is not a linear module of this model")
        if b_key not in tensors:
            raise CheckpointError(f"adapter has {PREFIX}{a_key} but no {PREFIX}{b_key}")
        base = bases[name]
        d_in, d_out = base.shape
        a_t, b_t = tensors[a_key], tensors[b_key]
        r = a_t.shape[0]
        if a_t.shape != (r, d_in) or b_t.shape != (d_out, r):
            raise CheckpointError(
                f"adapter tensors for {name} do not fit the model: {PREFIX}{a_key} is {a_t.shape} and "
                f"{PREFIX}{b_key} is {b_t.shape}, expected (r, {d_in}) and ({d_out}, r)")
        alpha = float(pattern_value(name, config.get("alpha_pattern"), config.get("lora_alpha", 8)))
        fields = dict(base=base, a=jnp.asarray(a_t.T, adapter_dtype), b=jnp.asarray(b_t.T, adapter_dtype),
                      scale=lora_scale(alpha, r, use_rslora), dropout=float(config.get("lora_dropout", 0.0)),
                      rslora=use_rslora)
        used |= {a_key, b_key}
        if config.get("use_dora"):
            m_key = f"{name}.lora_magnitude_vector"
            if m_key not in tensors:
                raise CheckpointError(f"a DoRA adapter (use_dora: true) needs {PREFIX}{m_key}, which is missing")
            if tensors[m_key].shape != (d_out,):
                raise CheckpointError(f"adapter tensor {PREFIX}{m_key} has shape {tensors[m_key].shape}, expected ({d_out},)")
            nodes[name] = DoraKernel(magnitude=jnp.asarray(tensors[m_key], adapter_dtype), **fields)
            used.add(m_key)
        else:
            nodes[name] = LoraKernel(**fields, train_b=init != "mica")
    return nodes, {}, used


def to_config(config: dict) -> tuple[str, LoraConfig]:
    # Values pass as PEFT wrote them: LoraConfig checks their types (r: "abc" is an error, not int("abc")).
    # a mica adapter trains on with b frozen; other inits only decided the start, which the file replaces
    init = "mica" if config.get("init_lora_weights") == "mica" else "kaiming"
    return "lora", LoraConfig(variant="dora" if config.get("use_dora") else "lora", r=config.get("r", 8), init=init,
                              alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0),
                              use_rslora=config.get("use_rslora", False),
                              rank_pattern=config.get("rank_pattern") or {},
                              alpha_pattern=config.get("alpha_pattern") or {},
                              trainable_token_indices=config.get("trainable_token_indices"),
                              **targeting_from_peft(config))


# LoRA's file also carries trainable token rows (its trainable_token_indices)
register_peft_format(PeftFormat(peft_type="LORA", write=write, read=read, to_config=to_config,
                                write_carried=trainable_tokens.write_carried,
                                read_carried=trainable_tokens.read_carried))
