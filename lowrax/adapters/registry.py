"""The registry of adapter methods and of PEFT's adapter formats.

A method module registers itself when it is imported (`lowrax.adapters.catalog` imports
them all):

    register_method(AdapterMethod(name="ia3", config=IA3Config, build=build_ia3_nodes, ...))
    register_peft_format(PeftFormat(peft_type="IA3", write=..., read=...))

Shared code asks here and never names a method: `lowrax.wrap` finds the method
by the type of its config, `lowrax train` by the `method:` key, the PEFT
reader by `peft_type` and the writer by the nodes' `peft_type`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from lowrax.core.registry import Registry
from lowrax.errors import LowraxError

# build(bases: {module name: frozen kernel [in, out]}, cfg, key, adapter_dtype, model_type)
#   -> ({module name: node}, {top-level key: arrays shared by the nodes})
BuildNodes = Callable[[dict, Any, Any, Any, Any], tuple[dict, dict]]


@dataclass(frozen=True)
class AdapterMethod:
    """One method as `lowrax.wrap` and `lowrax train` see it."""

    name: str  # the `method:` key of lowrax train and the name of its config section
    config: type  # its config dataclass (a `TargetConfig`), with PEFT's field names
    build: BuildNodes | None  # the nodes that replace the targeted kernels, initialised from them and a key
    # the module roles it adapts when target_modules is unset (lowrax.models.base.Model.module_roles)
    default_roles: tuple[str, ...] = ()
    shared_keys: tuple[str, ...] = ()  # top-level tree keys holding arrays shared across layers
    # the modules it can adapt: params -> {dotted module name: tree path}; None: the linear kernels
    modules: Callable[[Any], dict] | None = None
    module_kind: str = "linear"  # how errors name those modules
    # instead of `build`: (params, cfg, key, adapter_dtype, model) -> the node that goes under the
    # tree's `prompt_encoder` key (prompt-learning methods: virtual tokens, not module adapters)
    build_virtual: Callable[..., Any] | None = None
    # instead of `build`: (params, cfg, key, adapter_dtype, model) -> {tree path: node} for nodes at
    # paths of their own (bottleneck adapters at the model's residual-stream sites)
    build_inserted: Callable[..., dict] | None = None
    # small configs of the method (and its variants) with default targets, by name: the
    # conformance suite (tests/test_conformance.py) runs each on every model family
    examples: dict[str, Callable[[], Any]] = field(default_factory=dict)
    identity_at_init: bool = True  # wrapped with its default init, the model computes what the base did
    # after `build`: (tree, cfg, key, adapter_dtype, model_type) -> tree, for what the method also adapts outside
    # its own modules (LoRA's trainable token rows in the embedding); None: nothing
    extend: Callable[..., Any] | None = None
    calibrated: bool = False  # `build` takes `calibration=` (statistics of calibration data; LoRA's data-driven inits)
    # `build` gets its bases in the order torch visits the modules (TinyLoRA numbers them): wrap needs the model
    module_order: bool = False
    sees_biases: bool = False  # `build` takes `biases=` {module name: the layer's bias or None} (GLoRA)
    # its frozen arrays decompose the base (FRoD's eigenbasis): a base in another dtype gives other ones,
    # so trained values carry across base dtypes only through the adapter as a whole, not array by array
    frozen_from_base: bool = False


@dataclass(frozen=True)
class PeftFormat:
    """One PEFT `peft_type`, both directions.

    write(nodes: {module name: node}, params, **options) -> (tensors under PEFT's full
        keys, the config fields of this type beyond `peft.common.common_config`'s);
        options: `model`, `initial` (the tree as wrapped), `use_rslora`; a format ignores those it has no use for.
    read(tensors (keys without the `base_model.model.` prefix), config,
         bases: {module name: frozen kernel (or what `modules` finds)}, adapter_dtype)
        -> ({module name: node}, {shared top-level arrays}, set of the tensor keys it used);
        the keys left over are `modules_to_save` tensors.
    to_config(config) -> (method name, method config) that wraps the same modules the same
        way (`lowrax import-peft` turns an adapter into a run that trains on).
    write_carried(nodes, params, model) -> (tensors, config fields): the nodes of another type riding
        along in this format's file (`AdapterNode.rides_along`: LoRA's trainable token rows); None: refused.
    read_carried(tensors, config, params, model, adapter_dtype) -> ({tree path: value to set}, used keys),
        or ({}, set()) when the file carries none.
    """

    peft_type: str
    write: Callable[..., tuple[dict, dict]]
    read: Callable[..., tuple[dict, dict, set]]
    to_config: Callable[[dict], tuple[str, Any]]
    modules: Callable[[Any], dict] | None = None  # what `read`'s bases are; None: the linear kernels
    write_carried: Callable[..., tuple[dict, dict]] | None = None
    read_carried: Callable[..., tuple[dict, set]] | None = None
    # A format with its own directory layout (AdapterHub's) instead of PEFT's files:
    # save_directory(params, nodes, out_dir, model, overwrite, base_model, fully_trained: {HF key: torch-layout
    # array}) -> Path;
    # load_directory(params, adapter_dir, model, adapter_dtype) -> params; recognises(config json) -> bool
    # where modules_to_save tensors go: PEFT's prompt-learning models wrap the HF model directly
    # (`base_model.classifier.weight`), the others one level deeper (`base_model.model.classifier.weight`)
    modules_to_save_prefix: str = "base_model.model."
    save_directory: Callable[..., Any] | None = None
    load_directory: Callable[..., Any] | None = None
    recognises: Callable[[dict], bool] | None = None
    module_order: bool = False  # `read` gets its bases in torch's module order: load_peft needs the model


_METHODS: Registry[AdapterMethod] = Registry("adapter method", "unknown adapter method {name!r}; methods: {names}",
                                             builtins="lowrax.adapters.catalog")
_PEFT_FORMATS: dict[str, PeftFormat] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    return _METHODS.register(method.name, method)


def register_peft_format(fmt: PeftFormat) -> PeftFormat:
    if fmt.peft_type in _PEFT_FORMATS:
        raise LowraxError(f"PEFT format {fmt.peft_type!r} is registered twice")
    _PEFT_FORMATS[fmt.peft_type] = fmt
    return fmt


def method_names() -> list[str]:
    return sorted(_METHODS.names())


def method_named(name: str) -> AdapterMethod:
    """The method registered as `name`, or an error listing the ones that exist."""
    return _METHODS[name]


def method_for_config(cfg: Any) -> AdapterMethod:
    """The method whose config class `cfg` is an instance of."""
    for method in _METHODS.values():
        if type(cfg) is method.config:
            return method
    raise LowraxError(f"{type(cfg).__name__} is not an adapter method's config; expected one of "
                      + ", ".join(m.config.__name__ for m in _METHODS.values()))


def shared_keys() -> tuple[str, ...]:
    """Top-level tree keys of arrays that some method shares across layers."""
    return tuple(k for m in _METHODS.values() for k in m.shared_keys)


def format_for_config(config: dict, where: str = "") -> PeftFormat:
    """The format of an adapter directory, from its adapter_config.json: PEFT's `peft_type`, or a
    format that recognises its own config (AdapterHub's)."""
    if "peft_type" not in config:
        for fmt in _peft_formats().values():
            if fmt.recognises is not None and fmt.recognises(config):
                return fmt
    return peft_format(config.get("peft_type"), where)


# PEFT's types lowrax does not read, with what they would need (docs/methods.md keeps the same table)
NOT_BUILT = {
    "XLORA": "X-LoRA mixes several LoRA adapters per token with a classifier over the hidden states",
    "POLY": "Poly routes between LoRA skills with a per-task router",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning decomposes a shared prompt per task id",
    "CPT": "CPT trains the embeddings of in-context examples with its own loss weighting",
    "CARTRIDGE": "a cartridge is a trained KV-cache prefix initialised from the model's own cache",
    "ADAPTION_PROMPT": "Llama-Adapter adds gated prompts inside the top attention layers",
    "PSOFT": ("PSOFT's file holds only the r x r rotation; PEFT recomputes the frozen factors around it from an SVD "
              "of the base at load, and their signs (which change the adapter's meaning) depend on the LAPACK build, "
              "so its adapters do not carry over exactly between SVD implementations"),
}


def peft_format(peft_type: str, where: str = "") -> PeftFormat:
    formats = _peft_formats()
    if peft_type not in formats:
        reason = f" ({NOT_BUILT[peft_type]}; not built in lowrax yet)" if peft_type in NOT_BUILT else ""
        raise LowraxError(f"{where}adapter type {peft_type!r} is not supported{reason}; supported peft_type values: "
                          + ", ".join(sorted(formats)))
    return formats[peft_type]


def _peft_formats() -> dict[str, PeftFormat]:
    """The registered formats, the built-in ones included (registered beside their methods)."""
    method_names()
    return _PEFT_FORMATS
