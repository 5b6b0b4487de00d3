"""FourierFT (Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform"; PEFT
`FourierFTConfig`): a layer trains `n_frequency` coefficients of its weight delta's 2-D spectrum, at
positions drawn once from a seed; the delta is the real part of the inverse 2-D DFT.

    delta (torch's [out, in]) = Re IFFT2(S) * scaling     S [out, in]: the coefficients at their positions, 0 elsewhere
    y = x @ base + x @ delta

The positions are the first n_frequency entries of torch's `randperm(out * in)` seeded with
`random_loc_seed` (`adapters.torch_random` reproduces it without torch), as row-major (out, in) indices;
PEFT saves only the coefficients, so the seed in the config is what places them. Coefficients start at
zero with `init_weights=True`; PEFT's default (`False`) draws them standard normal, changing the model at
init (lowrax draws the same distribution, not torch's numbers).

PEFT format (`peft_type: FOURIERFT`): `<module>.fourierft_spectrum` shaped (n,); `n_frequency`,
`n_frequency_pattern`, `scaling`, `random_loc_seed` in the config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.delta import DeltaKernel
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, check_patterns, pattern_value, targeting_from_peft
from lowrax.adapters.torch_random import torch_randperm_head
from lowrax.core.checked import Count, PositiveFloat, PositiveInt
from lowrax.core.node import FACTOR
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, fan_in_fan_out, one_setting, value_and_pattern

SUFFIX = ".fourierft_spectrum"


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FourierFTConfig(TargetConfig):
    """FourierFT's hyper-parameters, with PEFT's names and defaults."""

    n_frequency: PositiveInt = 1000  # trained spectrum coefficients per layer (at most in * out)
    scaling: PositiveFloat = 150.0  # the delta's scale
    random_loc_seed: Count = 777  # seeds the coefficients' positions (torch.randperm's generator)
    n_frequency_pattern: dict = field(default_factory=dict)  # regex on module name -> its n_frequency
    init_weights: bool = False  # False (PEFT's default): coefficients standard normal; True: zeros (the base model)

    def __post_init__(self):
        super().__post_init__()
        check_patterns(self, "n_frequency_pattern", self.n_frequency_pattern, PositiveInt)


@functools.lru_cache(maxsize=256)
def spectrum_positions(d_out: int, d_in: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows in [0, out), columns in [0, in)) of the trained coefficients, as PEFT places them."""
    flat = torch_randperm_head(d_out * d_in, count, seed)
    return flat // d_in, flat % d_in


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class FourierFTKernel(DeltaKernel):
    """base [in, out] frozen; spectrum [n] trained, at the (out, in) positions `seed` draws."""

    base: Any
    spectrum: jnp.ndarray
    scaling: float = struct.field(pytree_node=False, default=150.0)
    seed: int = struct.field(pytree_node=False, default=777)
    peft_type = "FOURIERFT"

    def field_labels(self) -> dict:
        return {"spectrum": FACTOR}

    def field_axes(self) -> dict:
        return {"spectrum": (None,)}

    @property
    def folds_into_base(self) -> bool:
        return True

    def delta(self) -> jnp.ndarray:
        d_in, d_out = self.base.shape
        rows, cols = spectrum_positions(d_out, d_in, int(self.spectrum.shape[0]), self.seed)
        dense = jnp.zeros((d_out, d_in), jnp.float32).at[rows, cols].set(self.spectrum.astype(jnp.float32))
        return (jnp.fft.ifft2(dense).real * self.scaling).T


# --- build ----------------------------------------------------------------------------------------

def frequency_count(name: str, base, default: int, patterns: dict | None) -> int:
    n = int(pattern_value(name, patterns, default))
    d_in, d_out = base.shape
    if n > d_in * d_out:
        raise LowraxError(f"FourierFT n_frequency {n} exceeds {name}'s {d_out} x {d_in} = {d_in * d_out} weights; "
                          "lower n_frequency or set n_frequency_pattern for it")
    return n


def node_for(base, spectrum, seed: int, scaling: float) -> FourierFTKernel:
    return FourierFTKernel(base=base, spectrum=spectrum, scaling=float(scaling), seed=int(seed))


def build_nodes(bases: dict[str, Any], cfg: FourierFTConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        n = frequency_count(name, base, cfg.n_frequency, cfg.n_frequency_pattern)
        spectrum = (jnp.zeros((n,), adapter_dtype) if cfg.init_weights
                    else jax.random.normal(jax.random.fold_in(key, i), (n,), jnp.float32).astype(adapter_dtype))
        nodes[name] = node_for(base, spectrum, cfg.random_loc_seed, cfg.scaling)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, FourierFTKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    counts = {name: int(node.spectrum.shape[0]) for name, node in nodes.items()}
    common, pattern = value_and_pattern(counts)
    tensors = {f"{PREFIX}{name}{SUFFIX}": np.asarray(node.spectrum, np.float32) for name, node in nodes.items()}
    return tensors, {"n_frequency": common, "n_frequency_pattern": pattern,
                     "scaling": one_setting((n.scaling for n in nodes.values()), "FourierFT", "scaling"),
                     "random_loc_seed": one_setting((n.seed for n in nodes.values()), "FourierFT", "random_loc_seed"),
                     "fan_in_fan_out": fan_in_fan_out(model), "init_weights": False, "bias": "none"}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    seed, scaling = config.get("random_loc_seed", 777), config.get("scaling", 150.0)
    if seed is None:
        raise CheckpointError("FourierFT adapter_config.json has random_loc_seed null: the spectrum's positions "
                              "cannot be recovered without it")
    nodes = {}
    for name in adapted_modules(tensors, SUFFIX, bases, "FourierFT"):
        n = int(pattern_value(name, config.get("n_frequency_pattern"), config.get("n_frequency", 1000)))
        spectrum = adapter_tensor(tensors, name, SUFFIX[1:], (n,), "FourierFT")
        nodes[name] = node_for(bases[name], jnp.asarray(spectrum, adapter_dtype), seed, scaling)
    return nodes, {}, {f"{n}{SUFFIX}" for n in nodes}


def to_config(config: dict) -> tuple[str, FourierFTConfig]:
    return "fourierft", FourierFTConfig(
        n_frequency=int(config.get("n_frequency", 1000)), scaling=float(config.get("scaling", 150.0)),
        random_loc_seed=int(config.get("random_loc_seed", 777)),
        n_frequency_pattern=dict(config.get("n_frequency_pattern") or {}), **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="fourierft", config=FourierFTConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"fourierft": lambda: FourierFTConfig(n_frequency=16, scaling=10.0)},
                              identity_at_init=False))
register_peft_format(PeftFormat(peft_type="FOURIERFT", write=write, read=read, to_config=to_config))
