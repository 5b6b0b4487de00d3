"""Several adapters on one base from the shell: `lowrax generate --adapter a=DIR --adapter b=DIR`
and `lowrax merge-adapters`. Each DIR is a PEFT LoRA adapter directory or a `lowrax train` run
(its `adapter/` export)."""

from __future__ import annotations

from pathlib import Path

import jax

from lowrax.core.atomic import check_output
from lowrax.merging.combine_adapters import FACTOR_TYPES, check_equal_ranks, combine_adapters
from lowrax.errors import LowraxError
from lowrax.models.pretrained import base_model_name, base_model_path, load_pretrained, load_tokenizer
from lowrax.peft.common import CONFIG
from lowrax.adapters.named.exchange import load_peft, save_peft
from lowrax.peft.format import read_adapter_config
from lowrax.train.runs import Adapted, read_run_config, recorded_base, uses_chat_template
from lowrax.train.build import DTYPES


def parse_named(specs: list[str], flag: str = "--adapter") -> list[tuple[str, Path]]:
    """[(name, directory)] from NAME=DIR strings, names unique."""
    out = []
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise LowraxError(f"{flag} {spec!r}: expected NAME=DIR (e.g. {flag} dates=runs/default)")
        if name in dict(out):
            raise LowraxError(f"{flag}: the name {name!r} is given twice")
        out.append((name, Path(directory)))
    return out


def adapter_directory(path: Path) -> Path:
    """The PEFT adapter directory of a run (RUN/adapter) or the directory itself."""
    if (path / "config.yaml").exists():
        if not (path / "adapter" / CONFIG).exists():
            raise LowraxError(f"run {path} has no adapter/ export yet (the run writes it when it finishes; or run "
                              f"`lowrax export-peft {path} DIR` and give DIR)")
        return path / "adapter"
    read_adapter_config(path)  # a clear error for a directory that is neither
    return path


def load_named_adapters(named: list[tuple[str, Path]], model_path: str | None = None,
                        dtype: str | None = None) -> Adapted:
    """The base (`model_path`, else the first adapter's recorded base) with every adapter loaded by name;
    the first is active."""
    dirs = [(name, adapter_directory(path)) for name, path in named]
    if model_path is None:
        first = dirs[0][1]
        model_path = base_model_path(recorded_base(read_adapter_config(first)), where=f"{first}: ")
    model, params = load_pretrained(model_path, dtype=DTYPES[dtype or "float32"])
    for name, directory in dirs:
        try:
            params = load_peft(params, directory, model, adapter_name=name)
        except LowraxError as e:
            raise LowraxError(f"adapter {name}={directory}: {e}") from None
    runs = [path for _, path in named if (path / "config.yaml").exists()]
    chat = uses_chat_template(read_run_config(runs[0])) if runs else None
    listing = ", ".join(f"{n}={d}" for n, d in dirs)
    return Adapted(model, params, load_tokenizer(model_path), chat, f"adapters {listing}")


def merge_adapter_dirs(named: list[tuple[str, Path]], weights: list[float], out_dir: str | Path,
                       combination_type: str = "svd", model_path: str | None = None, overwrite: bool = False,
                       seed: int = 0, **options) -> Path:
    """Combine the adapters as `lowrax.combine_adapters` does and write the result as a PEFT adapter."""
    check_output(out_dir, overwrite, (model_path, *(d for _, d in named)))
    _check_ranks_before_loading(named, combination_type)
    adapted = load_named_adapters(named, model_path)
    names = [n for n, _ in named]
    combined = combine_adapters(adapted.params, names, weights, "combined", combination_type,
                                key=jax.random.key(seed), **options)
    first = adapter_directory(named[0][1])
    base = recorded_base(read_adapter_config(first)) if model_path is None else base_model_name(model_path)
    return save_peft(combined, out_dir, adapted.model, base_model=base, overwrite=overwrite, adapter_name="combined")


def _check_ranks_before_loading(named: list[tuple[str, Path]], combination_type: str) -> None:
    """The factor types need equal ranks: refuse unequal ones from the adapters' configs, before the
    base loads (the combination checks every layer again once loaded)."""
    if combination_type not in FACTOR_TYPES:
        return
    configs = {name: read_adapter_config(adapter_directory(path)) for name, path in named}
    if any(c.get("rank_pattern") for c in configs.values()):
        return  # per-layer ranks: only the loaded layers tell
    check_equal_ranks({name: c.get("r") for name, c in configs.items()}, combination_type)
