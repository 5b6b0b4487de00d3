"""LoRA and its variants as a pure transform of the parameter tree: `wrap(params, LoraConfig(...), key)`.

Targeted kernels become adapter nodes (frozen base + trainable arrays): `LoraKernel`
for LoRA, LoRA-FA, rsLoRA and PiSSA init, `DoraKernel`, `VeraKernel` or
`DeltaLoraKernel` for the other variants (`LoraConfig.variant`);
`modules_to_save` leaves become `FullyTrained` nodes. Module names are the HF
ones (`model.layers.0.self_attn.q_proj`), matched as PEFT matches them, so a
config written for PEFT selects the same layers here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from lowrax.errors import LowraxError
from lowrax.io.tables import get_path, set_path
from lowrax.nodes import FullyTrained, LoraKernel, is_adapter, is_node
from lowrax.variants import delta_lora, dora, pissa, vera

# PEFT's default targets per model_type (peft.utils.constants).
DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",), "bert": ("query", "value"), "roberta": ("query", "value"),
}
# Output heads that "all-linear" leaves alone, as PEFT does.
OUTPUT_HEADS = ("lm_head", "classifier", "score")
INITS = ("kaiming", "gaussian", "random", "pissa")
VARIANTS = ("lora", "lora_fa", "dora", "vera", "delta_lora")
# Options that belong to one variant (None = unset, the variant's default applies).
VARIANT_OPTIONS = {"d_initial": "vera", "delta_lambda": "delta_lora", "delta_start_step": "delta_lora",
                   "fa_projected_grad": "lora_fa"}


@dataclass(frozen=True)
class LoraConfig:
    """LoRA and variant hyper-parameters, with PEFT's names and defaults."""

    r: int = 8  # rank of A [in, r] and B [r, out]
    alpha: float = 8.0  # scale = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the input of the low-rank path, training only
    # Module names (suffix match), one regex (full match on the dotted name), "all-linear",
    # or None for PEFT's default for the model type.
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None  # same matching as target_modules
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    # "kaiming" (PEFT default: Kaiming-uniform A, zero B), "gaussian", "random" (B nonzero too, for tests),
    # "pissa" (A, B = the top-r singular part of W; the base keeps the rest)
    init: str = "kaiming"
    rank_pattern: dict = field(default_factory=dict)  # regex on module name -> rank
    alpha_pattern: dict = field(default_factory=dict)  # regex on module name -> alpha
    layers_to_transform: tuple[int, ...] | None = None  # only these layer indices
    modules_to_save: tuple[str, ...] = ()  # modules trained in full, e.g. ("classifier",)
    # lora | lora_fa (A frozen at init) | dora (magnitude + direction) | vera (shared random
    # projections, trained scaling vectors) | delta_lora (the base follows the adapter's change)
    variant: str = "lora"
    d_initial: float | None = None  # vera: initial value of the lambda_d vector (default 0.1)
    delta_lambda: float | None = None  # delta_lora: the base moves by lambda * s * (A'B' - AB) (default 0.5)
    delta_start_step: int | None = None  # delta_lora: optimizer steps before the base starts moving (default 0)
    fa_projected_grad: bool | None = None  # lora_fa: PEFT's LoRA-FA optimizer rule for B's gradient (default false)

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise LowraxError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LowraxError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise LowraxError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        if self.variant not in VARIANTS:
            close = difflib.get_close_matches(str(self.variant), VARIANTS, n=1)
            raise LowraxError(f"LoraConfig.variant must be one of {VARIANTS}, got {self.variant!r}"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        for option, owner in VARIANT_OPTIONS.items():
            if getattr(self, option) is not None and self.variant != owner:
                raise LowraxError(f"LoraConfig.{option} applies to variant {owner!r} only; this config has "
                                  f"variant={self.variant!r} (set variant: {owner})")
        self._check_variant_combinations()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.modules_to_save, (list, str)):
            object.__setattr__(self, "modules_to_save", tuple([self.modules_to_save] if isinstance(self.modules_to_save, str) else self.modules_to_save))
        if isinstance(self.layers_to_transform, (list, int)):
            lt = self.layers_to_transform
            object.__setattr__(self, "layers_to_transform", (lt,) if isinstance(lt, int) else tuple(lt))

    def _check_variant_combinations(self) -> None:
        if self.init == "pissa" and self.variant not in ("lora", "lora_fa"):
            raise LowraxError(f"init='pissa' applies to variants 'lora' and 'lora_fa', not {self.variant!r}")
        if self.variant == "vera":
            for option, default in (("rank_pattern", {}), ("alpha_pattern", {}), ("use_rslora", False)):
                if getattr(self, option) != default:
                    raise LowraxError(f"LoraConfig.{option} does not apply to variant 'vera' (one rank, no alpha)")
            if self.init not in ("kaiming", "random"):
                raise LowraxError(f"variant 'vera' takes init 'kaiming' (PEFT's) or 'random', not {self.init!r}")
        if self.variant == "delta_lora" and self.dropout > 0:
            raise LowraxError("variant 'delta_lora' has no dropout on the low-rank path (as in the paper); set dropout: 0")

    @classmethod
    def from_dict(cls, values: dict) -> "LoraConfig":
        """Build from a dict, rejecting unknown keys with the closest valid name."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
                raise LowraxError(f"unknown LoRA config key {key!r}{hint}")
        return cls(**values)


def module_matches(name: str, spec: str | Sequence[str] | None) -> bool:
    """PEFT's rule: a string is a regex matched against the full dotted name; a list
    matches a name equal to an entry or ending in `.entry`."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


_LAYER_INDEX = re.compile(r".*\.(?:layers|h|layer|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER_INDEX.match(name + ".")
    return int(m.group(1)) if m else None


def pattern_value(name: str, patterns: dict | None, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first regex matching the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", name):
            return value
    return default


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """The factor on A @ B: alpha / r, or rank-stabilised alpha / sqrt(r)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def linear_modules(params: Any) -> dict[str, tuple[str, ...]]:
    """Dotted module name -> tree path of every linear kernel (2-D leaf named `kernel`)."""
    from lowrax.quant.nf4 import NF4Tensor

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: is_node(x) or isinstance(x, NF4Tensor))[0]:
        keys = tuple(str(p.key) for p in path)
        if keys[-1] == "kernel" and getattr(leaf, "ndim", len(getattr(leaf, "shape", ()))) == 2:
            out[".".join(keys[:-1])] = keys
    return out


def select_targets(params: Any, cfg: LoraConfig, model_type: str | None = None) -> list[str]:
    """The dotted names of the modules `cfg` adapts, or a LowraxError listing the ones that exist."""
    modules = linear_modules(params)
    spec = cfg.target_modules
    if spec is None:
        if model_type not in DEFAULT_TARGETS:
            raise LowraxError(f"no default target_modules for model_type {model_type!r}; set target_modules")
        spec = DEFAULT_TARGETS[model_type]
    if spec == "all-linear":
        chosen = [n for n in modules if n.split(".")[0] not in OUTPUT_HEADS]
    else:
        chosen = [n for n in modules if module_matches(n, spec)]
    chosen = [n for n in chosen if not module_matches(n, cfg.exclude_modules)]
    if cfg.layers_to_transform is not None:
        chosen = [n for n in chosen if layer_index(n) in cfg.layers_to_transform]
    if not chosen:
        short = sorted({n.split(".")[-1] for n in modules})
        raise LowraxError(
            f"target_modules {spec!r} matched no linear module; module names that exist: {', '.join(short)}"
            + (" (after layers_to_transform/exclude_modules)" if cfg.layers_to_transform or cfg.exclude_modules else "")
        )
    return chosen


def _init_a(key, shape, init: str, r: int):
    d_in = shape[0]
    if init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / r
    # PEFT: kaiming_uniform_(a=sqrt(5)) on the torch (r, in) weight -> U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def wrap(params: Any, cfg: LoraConfig, key, model_type: str | None = None, adapter_dtype=jnp.float32) -> Any:
    """Replace the targeted kernels by adapter nodes of `cfg.variant` and `modules_to_save`
    leaves by `FullyTrained` nodes. Pure: returns a new tree, the input is untouched.

    key: a `jax.random.key` for the adapter initialisation.
    model_type: selects PEFT's default targets when `cfg.target_modules` is None.
    """
    targets = select_targets(params, cfg, model_type)
    modules = linear_modules(params)
    out = jax.tree.map(lambda x: x, params, is_leaf=is_node)  # a fresh copy of the dict structure
    bases = {}
    for name in targets:
        base = get_path(out, modules[name])
        if is_adapter(base):
            raise LowraxError(f"{name} is already adapted ({type(base).__name__}); merge it first")
        bases[name] = base

    def set_node(name, node):
        set_path(out, modules[name], node)

    if cfg.variant == "vera":
        vera.wrap_targets(out, bases, set_node, cfg.r, vera.DEFAULT_D_INITIAL if cfg.d_initial is None else cfg.d_initial,
                          cfg.dropout, key, adapter_dtype, random_b=cfg.init == "random")
    else:
        for i, (name, base) in enumerate(bases.items()):
            set_node(name, _lora_family_node(name, base, cfg, jax.random.fold_in(key, i), adapter_dtype))

    for module in cfg.modules_to_save:
        if module not in out:
            raise LowraxError(f"modules_to_save entry {module!r} is not a top-level module; existing: {', '.join(sorted(out))}")
        out[module] = jax.tree.map(FullyTrained, out[module])
    return out



def _lora_family_node(name: str, base, cfg: LoraConfig, key, adapter_dtype):
    """One adapter node with low-rank factors A, B (every variant but VeRA)."""
    from lowrax.tree import dense_kernel

    d_in, d_out = base.shape
    r = int(pattern_value(name, cfg.rank_pattern, cfg.r))
    if not 1 <= r <= min(d_in, d_out):
        raise LowraxError(f"LoRA rank r={r} for {name} must be in 1..{min(d_in, d_out)} (min of its in={d_in}, out={d_out})")
    alpha = float(pattern_value(name, cfg.alpha_pattern, cfg.alpha))
    scale = lora_scale(alpha, r, cfg.use_rslora)
    if cfg.init == "pissa":
        a, b, residual = pissa.pissa_init(dense_kernel(base), r, scale, adapter_dtype)
        base = _requantized_like(base, residual)
    else:
        ka, kb = jax.random.split(key)
        a = _init_a(ka, (d_in, r), cfg.init, r).astype(adapter_dtype)
        if cfg.init == "random":
            b = (jax.random.normal(kb, (r, d_out), jnp.float32) * 0.02).astype(adapter_dtype)
        else:
            b = jnp.zeros((r, d_out), adapter_dtype)
    if cfg.variant == "dora":
        # m starts at ||W + s A B||_c, so the DoRA kernel equals W + s A B at init.
        magnitude = dora.column_norms(dense_kernel(base), a, b, scale).astype(adapter_dtype)
        return dora.DoraKernel(base=base, a=a, b=b, magnitude=magnitude, scale=scale, dropout=cfg.dropout)
    if cfg.variant == "delta_lora":
        return delta_lora.DeltaLoraKernel(
            base=base, a=a, b=b, anchor_a=jnp.copy(a), anchor_b=jnp.copy(b), scale=scale,  # own buffers: donated apart
            delta_lambda=delta_lora.DEFAULT_LAMBDA if cfg.delta_lambda is None else float(cfg.delta_lambda),
            start_step=delta_lora.DEFAULT_START_STEP if cfg.delta_start_step is None else int(cfg.delta_start_step))
    return LoraKernel(base=base, a=a, b=b, scale=scale, dropout=cfg.dropout, train_a=cfg.variant != "lora_fa",
                      fa_projected_grad=bool(cfg.fa_projected_grad), pissa_residual=cfg.init == "pissa")


def _requantized_like(base, residual):
    """The PiSSA residual in the base's storage: NF4 bases are quantized again (QLoRA + PiSSA)."""
    from lowrax.quant.nf4 import NF4Tensor, quantize

    if isinstance(base, NF4Tensor):
        return quantize(residual.astype(base.dtype), base.blocksize, base.double_quantized, transpose=base.transposed)
    return residual
