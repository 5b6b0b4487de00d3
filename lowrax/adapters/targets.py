"""Which modules a method adapts: the targeting fields every method's config shares, and
PEFT's matching rules.

Module names are the HF ones (`model.layers.0.self_attn.q_proj`), matched as
PEFT matches them, so a config written for PEFT selects the same layers here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, Sequence

import jax

from lowrax.core.checked import Checked, ConfigValueError, Count, conforms, describe, owner_name
from lowrax.core.node import is_node
from lowrax.errors import LowraxError
from lowrax.core.kernels import is_kernel_type

# The roles (lowrax.models.base.Model.module_roles) PEFT's LoRA-style methods adapt by default.
ATTENTION_QV = ("q", "v")


def default_targets(method: str, roles: tuple[str, ...], model_type: str | None) -> tuple[str, ...] | None:
    """A method's default target_modules for `model_type`: the modules its family gives `roles`
    (in role order, once each), or PEFT's own choice where the family records that PEFT departs
    from the roles; None when the family is unknown or lacks one of the roles."""
    from lowrax.models import FAMILIES

    if model_type not in FAMILIES or not roles:
        return None
    family = FAMILIES[model_type][1]
    exception = family.peft_default_exceptions.get(model_type, {}).get(method)
    if exception is not None:
        return tuple(exception)
    if any(role not in family.module_roles for role in roles):
        return None
    out: list[str] = []
    for role in roles:
        out += [m for m in family.module_roles[role] if m not in out]
    return tuple(out)


# Output heads that "all-linear" leaves alone, as PEFT does.
OUTPUT_HEADS = ("lm_head", "classifier", "score")


def as_tuple(value):
    if isinstance(value, list):
        return tuple(value)
    return value


@dataclass(frozen=True, kw_only=True)
class TargetConfig(Checked):
    """The fields with which every method's config (a subclass) selects modules, with PEFT's names.

    Keyword-only, so a subclass's own fields keep their positions."""

    # Module names (suffix match), one regex (full match on the dotted name), "all-linear",
    # or None for PEFT's default for the model type.
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None  # same matching as target_modules
    layers_to_transform: Count | tuple[Count, ...] | None = None  # only these layer indices
    modules_to_save: str | tuple[str, ...] = ()  # modules trained in full, e.g. ("classifier",)

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            check_regex(self, name, getattr(self, name))
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        if isinstance(self.layers_to_transform, int):
            object.__setattr__(self, "layers_to_transform", (self.layers_to_transform,))

    @classmethod
    def from_dict(cls, values: dict) -> "TargetConfig":
        return config_from_dict(cls, values)

    def for_run(self, *, steps: int, model_dir: Any) -> "TargetConfig":
        """The config as a `lowrax train` run of `steps` steps on the model in `model_dir` uses it:
        a method whose settings depend on the run (AdaLoRA's schedule length, prompt tuning's
        tokenizer) fills them in; the rest are unchanged."""
        return self


def check_regex(config, key: str, value) -> None:
    """A string target (PEFT reads one string as a regex) must compile: an error names the key."""
    if isinstance(value, str) and value != "all-linear":
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigValueError(owner_name(config), key, value, f"a valid regular expression ({e})") from None


def check_patterns(config, key: str, patterns: dict, value_type) -> None:
    """rank_pattern / alpha_pattern: {regex on module names: value}, every regex valid, every value of the
    annotated `value_type` (PositiveInt ranks, PositiveFloat alphas)."""
    for pattern, value in patterns.items():
        if not isinstance(pattern, str):
            raise ConfigValueError(owner_name(config), key, patterns,
                                   f"a mapping of module-name regexes to {describe(value_type)}")
        check_regex(config, key, pattern)
        if not conforms(value_type, value):
            raise ConfigValueError(owner_name(config), f"{key}[{pattern!r}]", value, describe(value_type))


def config_from_dict(cls, values: dict):
    """A method config from a dict, rejecting unknown keys with the closest valid name."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise LowraxError(f"unknown {cls.__name__} key {key!r}{hint}")
    return cls(**values)


def targeting_from_peft(peft_config: dict) -> dict:
    """The `TargetConfig` fields of a PEFT `adapter_config.json`."""
    targets = peft_config.get("target_modules")
    return {"target_modules": as_tuple(targets), "exclude_modules": as_tuple(peft_config.get("exclude_modules")),
            "layers_to_transform": peft_config.get("layers_to_transform"),
            "modules_to_save": as_tuple(peft_config.get("modules_to_save") or ())}


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


def linear_modules(params: Any) -> dict[str, tuple[str, ...]]:
    """Dotted module name -> tree path of every linear kernel (2-D leaf named `kernel`)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: is_node(x) or is_kernel_type(x))[0]:
        keys = tuple(str(p.key) for p in path)
        if keys[-1] == "kernel" and getattr(leaf, "ndim", len(getattr(leaf, "shape", ()))) == 2:
            out[".".join(keys[:-1])] = keys
    return out


def norm_modules(params: Any) -> dict[str, tuple[str, ...]]:
    """Dotted module name -> tree path of every normalisation layer (a dict with a 1-D `scale`)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: is_node(x) or is_kernel_type(x))[0]:
        keys = tuple(str(p.key) for p in path)
        if keys[-1] == "scale" and len(getattr(leaf, "shape", ())) == 1:
            out[".".join(keys[:-1])] = keys[:-1]
    return out


def select_targets(params: Any, cfg: TargetConfig, model_type: str | None = None,
                   default_roles: tuple[str, ...] = (), method: str = "this method",
                   modules: dict | None = None, kind: str = "linear") -> list[str]:
    """The dotted names of the modules `cfg` adapts, or a LowraxError listing the ones that exist.
    default_roles: the roles whose modules are adapted when cfg.target_modules is None.
    modules: the candidates ({name: path}; default the linear kernels); kind names them in errors."""
    modules = linear_modules(params) if modules is None else modules
    spec = cfg.target_modules
    if spec is None:
        spec = default_targets(method, default_roles, model_type)
        if spec is None:
            raise LowraxError(f"{method} has no default target_modules for model_type {model_type!r}; set target_modules")
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
            f"target_modules {spec!r} matched no {kind} module; module names that exist: {', '.join(short)}"
            + (" (after layers_to_transform/exclude_modules)" if cfg.layers_to_transform or cfg.exclude_modules else "")
        )
    return chosen


def torch_module_order(model, names) -> list[str]:
    """`names` (dotted linear-module names) in the order torch's `named_modules` visits them: stack by
    stack, layer by layer, and within a layer in the order the layer defines its modules. PEFT numbers
    modules in that order where a method shares arrays between neighbours (TinyLoRA's weight tying)."""
    template_rank: dict[str, int] = {}
    prefix_rank: dict[str, int] = {}
    for spec in model.tensors():
        module = spec.hf_key.rsplit(".", 1)[0]
        prefix, _, _ = _split_at_index(module)
        prefix_rank.setdefault(prefix, len(prefix_rank))
        template_rank.setdefault(re.sub(r"\.\d+\.", ".#.", module), len(template_rank))

    def key(name: str):
        prefix, index, _ = _split_at_index(name)
        template = re.sub(r"\.\d+\.", ".#.", name)
        return (prefix_rank.get(prefix, len(prefix_rank)), index, template_rank.get(template, len(template_rank)), name)

    return sorted(names, key=key)


def _split_at_index(name: str) -> tuple[str, int, str]:
    """(the part before the first numeric component, that number (-1 without one), the rest)."""
    match = re.search(r"\.(\d+)\.", name)
    if match is None:
        return name, -1, ""
    return name[: match.start()], int(match.group(1)), name[match.end():]
