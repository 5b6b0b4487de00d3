"""`lowrax.load_peft` / `lowrax.save_peft`: PEFT's format (`lowrax.peft.format`) with named adapters.

Without `adapter_name` these are `lowrax.peft.format`'s functions. With it, `load_peft` adds the
adapter to the named ones `params` hold and `save_peft` writes one of them. They live above the
PEFT layer because named adapters are LoRA's (`adapters.named` knows `LoraKernel`, which
`peft.format` never names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from lowrax.adapters.named.named import DEFAULT_CAPACITY, add_adapter, adapter_names, base_params, extract_adapter
from lowrax.core.slot_directory import has_named_adapters
from lowrax.errors import LowraxError
from lowrax.peft import format as single


def load_peft(params: Any, adapter_dir: str | Path, model=None, adapter_dtype=jnp.float32, *,
              adapter_name: str | None = None, capacity: int = DEFAULT_CAPACITY) -> Any:
    """Wrap plain `params` with the adapter PEFT saved in `adapter_dir` (any registered `peft_type`).

    adapter_name: add it as a named LoRA adapter beside those `params` may hold already (see
    `lowrax.add_adapter`; capacity: the slots made with the first one)."""
    if adapter_name is not None:
        return add_adapter(params, adapter_name,
                           single.load_peft(base_params(params), adapter_dir, model, adapter_dtype), capacity=capacity)
    if has_named_adapters(params):
        raise LowraxError(f"these params hold named adapters ({', '.join(adapter_names(params)) or 'none loaded'}): "
                          "load another with load_peft(params, dir, model, adapter_name='b')")
    return single.load_peft(params, adapter_dir, model, adapter_dtype)


def save_peft(params: Any, out_dir: str | Path, model=None, *, adapter_name: str | None = None, **kwargs) -> Path:
    """Write the adapters of `params` as a PEFT adapter directory (atomically); with named
    adapters, the one named `adapter_name` (default: the active one). Other keywords: those of
    `lowrax.peft.format.save_peft` (base_model, overwrite, initial, use_rslora)."""
    if has_named_adapters(params):
        params = extract_adapter(params, adapter_name)
    elif adapter_name is not None:
        raise LowraxError(f"adapter_name={adapter_name!r} names one of several loaded adapters, but these params "
                          "hold no named adapters: save_peft(params, out_dir, model) writes the one they hold")
    return single.save_peft(params, out_dir, model, **kwargs)
