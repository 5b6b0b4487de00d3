"""NF4 weights in the 4-bit safetensors layout that transformers + bitsandbytes save.

For a weight `W` (HF key `....weight`) the checkpoint holds
    W                                   uint8 [ceil(n/2), 1]  packed codes
    W.absmax                            float32 [blocks], or uint8 with double quantization
    W.quant_map                         float32 [16]  the NF4 levels
    W.nested_absmax, W.nested_quant_map float32       (double quantization only)
    W.quant_state.bitsandbytes__nf4     uint8: JSON {quant_type, blocksize, dtype, shape[, nested_*]}
and config.json a `quantization_config` with `quant_method: bitsandbytes`.
"""

from __future__ import annotations

import json
from typing import Callable

import jax.numpy as jnp
import numpy as np

from lowrax.errors import CheckpointError
from lowrax.quant import nf4
from lowrax.quant.codes import DYNAMIC_MAP, NF4_LEVELS

STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
# Tensors stored beside a 4-bit weight (not parameters of their own).
STATISTIC_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", STATE_SUFFIX)


def is_quantized(key: str, has: Callable[[str], bool]) -> bool:
    return has(key + STATE_SUFFIX)


def read_state(raw: np.ndarray) -> dict:
    return json.loads(bytes(np.asarray(raw, np.uint8)).decode())


def nf4_from_tensors(key: str, get: Callable[[str], np.ndarray], has: Callable[[str], bool]) -> nf4.NF4Tensor:
    """Rebuild the NF4Tensor bitsandbytes saved under `key`, in the HF layout (a missing statistic is named).

    `tables.Tensor.from_hf` turns it into the Flax kernel's view, as it does for arrays.
    """
    state = read_state(get(key + STATE_SUFFIX))
    if state.get("quant_type") != "nf4":
        raise CheckpointError(f"{key}: quant_type {state.get('quant_type')!r} is not supported (supported: nf4)")
    double = "nested_offset" in state
    needed = [key + ".absmax", key + ".quant_map"] + ([key + ".nested_absmax", key + ".nested_quant_map"] if double else [])
    missing = [k for k in needed if not has(k)]
    if missing:
        raise CheckpointError(f"4-bit weight {key} is missing its statistics: {', '.join(missing)}")
    if not np.array_equal(get(key + ".quant_map").astype(np.float32), NF4_LEVELS):
        raise CheckpointError(f"{key}.quant_map is not the NF4 code book")
    return nf4.NF4Tensor(
        packed=jnp.asarray(get(key).reshape(-1)), absmax=jnp.asarray(get(key + ".absmax")),
        nested_absmax=jnp.asarray(get(key + ".nested_absmax")) if double else None,
        offset=jnp.asarray(np.float32(state["nested_offset"])) if double else None,
        nested_code=jnp.asarray(get(key + ".nested_quant_map").astype(np.float32)) if double else None,
        shape=tuple(state["shape"]), dtype=str(state["dtype"]).replace("torch.", ""), blocksize=int(state["blocksize"]))


def nf4_to_tensors(key: str, t: nf4.NF4Tensor) -> dict[str, np.ndarray]:
    """The checkpoint tensors bitsandbytes writes for an NF4 weight."""
    state = {"quant_type": "nf4", "blocksize": t.blocksize, "dtype": t.dtype, "shape": list(t.stored_shape)}
    out = {key: np.asarray(t.packed, np.uint8).reshape(-1, 1), key + ".absmax": np.asarray(t.absmax),
           key + ".quant_map": NF4_LEVELS.copy()}
    if t.double_quantized:
        state.update(nested_blocksize=nf4.NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(t.offset))
        out[key + ".nested_absmax"] = np.asarray(t.nested_absmax, np.float32)
        out[key + ".nested_quant_map"] = np.asarray(DYNAMIC_MAP if t.nested_code is None else t.nested_code, np.float32)
    out[key + STATE_SUFFIX] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    return out


def quantization_config(double_quant: bool) -> dict:
    """config.json's `quantization_config` for NF4 weights, as transformers writes it."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}
