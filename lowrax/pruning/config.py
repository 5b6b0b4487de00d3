"""`lowrax prune` configuration: frozen dataclasses, a YAML preset, `section.key=value` overrides.

    cfg = load_prune_config("configs/prune.yaml", ["prune.method=wanda", "prune.pattern=2:4"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from lowrax.core.checked import Bound, Checked, ConfigValueError, Count, OneOf, PositiveFloat, PositiveInt, Probability
from lowrax.errors import LowraxError
from lowrax.pruning import masks
from lowrax.pruning.sparsegpt import DEFAULT_BLOCKSIZE, DEFAULT_DAMPENING
from lowrax.train.config import override_parts, override_value, read_yaml_file, unknown_key


@dataclass(frozen=True)
class PruneModelSection(Checked):
    section_name = "model"

    path: str | None = None  # HF directory or .gguf file; None = the embedded SmolLM2-135M-Instruct
    dtype: Annotated[str, OneOf(("float32", "bfloat16"))] = "float32"  # dtype the model is loaded and saved in


@dataclass(frozen=True)
class PruneSection(Checked):
    section_name = "prune"

    method: Annotated[str, OneOf(("magnitude", "wanda", "sparsegpt"))] = "sparsegpt"
    sparsity: Probability = 0.5  # fraction of each layer's weights removed (unstructured)
    pattern: str = "unstructured"  # unstructured, or N:M (2:4, 4:8): N of every M consecutive inputs removed
    blocksize: PositiveInt = DEFAULT_BLOCKSIZE  # SparseGPT: columns per lazy batch update
    dampening: PositiveFloat = DEFAULT_DAMPENING  # SparseGPT: Hessian dampening, a fraction of its mean diagonal
    chunk_rows: PositiveInt = 8  # calibration rows per forward (the device holds one chunk's activations)
    ignore: tuple[str, ...] = ()  # substrings of module names to leave dense
    output_dir: str = "runs/pruned"  # the pruned model: HF safetensors + pruning.json + tokenizer


@dataclass(frozen=True)
class TextSection(Checked):
    source: str = "embedded"  # "embedded" (the Python docs set), a .txt file, or a .jsonl file
    text_field: str = "text"  # .jsonl: the field holding each record's text
    samples: Count = 32  # rows of text
    length: Annotated[int, Bound(low=2)] = 256  # tokens per row


@dataclass(frozen=True)
class PruneConfig:
    model: PruneModelSection = field(default_factory=PruneModelSection)
    prune: PruneSection = field(default_factory=PruneSection)
    calibration: TextSection = field(default_factory=TextSection)
    # Held-out perplexity before and after pruning (0 samples: skip it).
    evaluation: TextSection = field(default_factory=lambda: TextSection(samples=16))

    def __post_init__(self):
        p = self.prune
        masks.pattern_sparsity(p.pattern, p.sparsity)  # named errors for a bad pattern or sparsity
        if self.calibration.samples < 1:
            raise ConfigValueError("calibration", "samples", self.calibration.samples, "an integer >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": PruneModelSection, "prune": PruneSection, "calibration": TextSection, "evaluation": TextSection}


def _valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(key: str) -> LowraxError:
    return unknown_key(key, _valid_keys(), list(_SECTIONS), "prune config key")


def load_prune_config(path: str | Path | None = None, overrides: list[str] = ()) -> PruneConfig:
    """A PruneConfig from a YAML preset (None: the defaults) with `section.key=value` overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        values = read_yaml_file(p) or {}
        if not isinstance(values, dict):
            raise LowraxError(f"{p} must hold a mapping of sections ({', '.join(_SECTIONS)})")
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for item in overrides:
        key, parts, raw = override_parts(item, "prune.sparsity=0.25")
        if len(parts) != 2:
            raise _unknown(key)
        # YAML 1.1 reads 2:4 as the base-60 number 124: a pattern stays the string given
        values.setdefault(parts[0], {})[parts[1]] = raw.strip() if key == "prune.pattern" else override_value(key, raw)
    sections = {}
    for name, body in values.items():
        if name not in _SECTIONS:
            raise _unknown(name)
        if not isinstance(body, dict):
            raise LowraxError(f"prune config section {name!r} must be a mapping, got {type(body).__name__}")
        known = {f.name for f in dataclasses.fields(_SECTIONS[name])}
        for key in body:
            if key not in known:
                raise _unknown(f"{name}.{key}")
        if name == "prune" and "ignore" in body:
            body["ignore"] = body["ignore"] or ()
        if name == "prune" and not isinstance(body.get("pattern", ""), str):
            raise LowraxError(f"prune.pattern must be a string; got {body['pattern']!r} (YAML reads an unquoted 2:4 as "
                              "the number 124: write pattern: \"2:4\")")
        try:
            sections[name] = _SECTIONS[name](**body)
        except ConfigValueError as e:
            raise e.named(name) from None
    if "evaluation" in values and "samples" not in values["evaluation"]:
        sections["evaluation"] = dataclasses.replace(sections["evaluation"], samples=16)
    return PruneConfig(**sections)
