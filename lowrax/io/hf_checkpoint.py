"""Load and save lowrax parameter trees as HF model directories.

Loading walks the family's tensor table: each tensor is looked up by its HF
key (or the bare-model key without the task prefix, or the legacy
`gamma`/`beta` names), shape-checked, laid out for Flax and cast, one at a
time. Saving writes `config.json` and `model.safetensors` into a temporary
directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from lowrax.core import tables
from lowrax.core.atomic import write_directory
from lowrax.core.kernels import (dense_kernel, hf_statistic_suffixes, is_kernel_type, kernel_from_hf, kernel_types,
                                 native_hf_tensors, quantizer)
from lowrax.dist.sharding import param_shardings
from lowrax.errors import CheckpointError
from lowrax.io.safetensors_dir import SafetensorsDir, write_tensor_file

# `model` below is a lowrax.models.base.Model (its tensors() table, model_type, bare_prefix,
# checkpoint_key, config.hf); io sits below the models and names no class of theirs.
Model = Any

log = logging.getLogger(__name__)

# Buffers some checkpoints carry that are not parameters.
# (T5's per-stack embed_tokens are older files' copies of the shared table.)
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids", ".attn.bias", ".attn.masked_bias",
                     "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def candidate_keys(hf_key: str, bare_prefix: str | None) -> list[str]:
    """Names a tensor may have: as the task model saves it, without the task prefix, and legacy names."""
    keys = [hf_key]
    if bare_prefix and hf_key.startswith(bare_prefix):
        keys.append(hf_key[len(bare_prefix):])
    legacy = {".weight": ".gamma", ".bias": ".beta"}
    for key in list(keys):
        for new, old in legacy.items():
            if ".LayerNorm" in key and key.endswith(new):
                keys.append(key[: -len(new)] + old)
    return keys


def load_tensors(
    model: Model,
    lookup: Callable[[str], tuple[tuple[int, ...], Callable[[], np.ndarray]] | None],
    available: Iterable[str],
    dtype,
    source: str,
    progress: bool = True,
    quant=None,
    mesh=None,
    wrappers: dict | None = None,
) -> dict:
    """Build the parameter tree from a checkpoint, one tensor at a time.

    `lookup(hf_key)` returns (shape, read) for a key present in the checkpoint
    or None. Every missing or misshapen tensor is reported in one error. With
    `quant` (a QuantConfig) linear kernels are quantized to NF4 as they are read,
    so the full-precision model is never in memory at once. With `mesh` each tensor goes
    straight into its shards (`lowrax.dist.sharding` rules). `wrappers`: {dotted module name: wrap}
    from the directory's kernel-type records (`record_wrappers`: a pruned model's masks).
    """
    specs = model.tensors()
    missing, misshapen, used = [], [], set()
    resolved = []
    available = list(available)
    # keys under another transformers version's names (ViT), by the name the table uses
    renamed = {new: k for k in available if (new := model.checkpoint_key(k)) != k}
    for t in specs:
        for key in candidate_keys(t.hf_key, model.bare_prefix):
            found = lookup(key)
            if found is None and key in renamed:
                key = renamed[key]
                found = lookup(key)
            if found is not None:
                shape, read = found
                used.add(key)
                if tuple(shape) != t.hf_shape:
                    misshapen.append(f"{key}: expected shape {t.hf_shape}, found {tuple(shape)}")
                resolved.append((t, read))
                break
        else:
            if not t.optional:
                missing.append(t.hf_key)
    if missing or misshapen:
        lines = [f"missing tensor {k}" for k in missing] + [f"misshapen tensor {m}" for m in misshapen]
        shown = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
        raise CheckpointError(f"{source} does not fit a {model.model_type} model with this config.json:\n  {shown}")
    unused = [k for k in available if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if unused:
        log.warning("%s: %d tensors not used by %s, e.g. %s", source, len(unused), model.model_type, unused[:5])

    quant_kind = None if quant is None else quantizer(quant.method)
    tree: dict = {}
    for t in tqdm(resolved, desc=f"loading {Path(source).name}", unit="tensor", disable=not progress, leave=False):
        t, read = t
        value = read()  # in the HF layout: an array, or a kernel type's native form (4-bit codes)
        transposed = t.layout == tables.TRANSPOSE
        to_tree = lambda v: kernel_from_hf(v, t.shape, transposed)  # noqa: E731
        wrap = (wrappers or {}).get(".".join(t.path[:-1]))
        finish = None if wrap is None else wrap(value, to_tree)
        value = to_tree(value)
        if quant_kind is not None and not is_kernel_type(value) and _quantizable(t, quant):
            value = quant_kind.quantize(np.asarray(value).astype(dtype), quant, transposed)
        elif not is_kernel_type(value) and (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
            value = value.astype(dtype)

        def place(array, path=t.path):
            return jax.device_put(array, None if mesh is None else _sharding_of(model, mesh, path, array))

        value = place(value)
        if finish is not None:
            value = finish(value, place)
        tables.set_path(tree, t.path, value)
    return tree


def record_wrappers(directory: Path) -> dict:
    """{dotted module name: wrap} from the records a model directory carries for kernel types
    (a pruned model's pruning.json): how those modules' kernels are made on load."""
    out = {}
    for spec in kernel_types():
        path = Path(directory) / spec.record_file if spec.record_file else None
        if path is None or not path.exists():
            continue
        try:
            record = json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from e
        out.update(spec.restore(record))
    return out


def kernel_records(params: dict, extra: dict | None = None) -> dict[str, dict]:
    """{file name: record} a tree's kernel types write beside its weights (empty for plain kernels)."""
    out = {}
    for spec in kernel_types():
        if spec.record_file and (record := spec.record(params, extra)) is not None:
            out[spec.record_file] = record
    return out


def _sharding_of(model, mesh, path: tuple[str, ...], value):
    """The sharding the rules give one parameter (an array or a kernel type) at `path`."""
    single: dict = {}
    tables.set_path(single, path, value)
    return tables.get_path(param_shardings(single, model, mesh), path)


def _quantizable(t: tables.Tensor, quant) -> bool:
    """A 2-D linear kernel outside the QuantConfig's skip_modules."""
    return t.path[-1] == "kernel" and len(t.shape) == 2 and not any(
        skip in name for name in t.path for skip in quant.skip_modules)


def load_hf_directory(model: Model, directory: Path, dtype, progress: bool = True, quant=None, mesh=None) -> dict:
    """The parameter tree of an HF model directory (safetensors, single or sharded).

    Weights saved in a kernel type's native form (4-bit by transformers + bitsandbytes) load
    as that type (their statistics are read with them, so they are not reported as unused).
    """
    files = SafetensorsDir(directory)
    readers = [spec.read_hf for spec in kernel_types() if spec.read_hf is not None]
    statistics = hf_statistic_suffixes()

    def lookup(key):
        if key not in files:
            return None
        for read_native in readers:
            if (found := read_native(key, files)) is not None:
                return found
        return files.shape(key), lambda: files.get(key)

    tensors = [k for k in files.keys() if not (statistics and k.endswith(statistics))]
    return load_tensors(model, lookup, tensors, dtype, str(directory), progress, quant, mesh,
                        wrappers=record_wrappers(directory))


def tree_to_hf_tensors(params: dict, model: Model, keep_native: bool = False) -> dict[str, np.ndarray]:
    """HF-keyed numpy arrays for every tensor of the tree, in HF layout.

    Kernel types are saved dense (NF4 dequantized, a pruned kernel with its zeros), or with
    keep_native in their own checkpoint form (bitsandbytes' 4-bit layout) where they have one.
    """
    out = {}
    for t in model.tensors():
        try:
            leaf = tables.get_path(params, t.path)
        except KeyError:
            if t.optional:
                continue
            raise CheckpointError(f"params have no {'/'.join(t.path)} (HF key {t.hf_key})") from None
        if keep_native and (native := native_hf_tensors(t.hf_key, leaf, t.layout == tables.TRANSPOSE)) is not None:
            out.update(native)
            continue
        if is_kernel_type(leaf):
            leaf = dense_kernel(leaf)
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise CheckpointError(
                f"params leaf {'/'.join(t.path)} is a {type(leaf).__name__}, not an array; "
                "merge adapters into plain weights (lowrax.merge) before saving a full model"
            )
        array = np.asarray(jax.device_get(leaf))
        if array.shape != t.shape:
            raise CheckpointError(f"params leaf {'/'.join(t.path)} has shape {array.shape}, expected {t.shape}")
        out[t.hf_key] = t.to_hf(array)
    return out


def save_hf_directory(params: dict, model: Model, out_dir: str | Path, tokenizer=None, overwrite: bool = False,
                      keep_native: bool = False, record_extra: dict | None = None,
                      records: dict[str, dict] | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (+ tokenizer files) that transformers loads.

    keep_native: kernel types with a checkpoint form of their own (NF4) are saved in it, with the
    `quantization_config` transformers reads. A tree whose kernel types keep a record (a pruned
    model's pruning.json: each pruned module's pattern and sparsity, plus `record_extra`) gets
    that file too, and loading the directory makes those kernels of that type again. `records`:
    {file name: record} to write instead of the tree's own (those of the tree a merged one came from).

    Written to a temporary sibling directory and renamed into place, so a crash
    never leaves a half-written model behind.
    """
    tensors = tree_to_hf_tensors(params, model, keep_native)
    statistics = hf_statistic_suffixes()
    dtypes = {str(a.dtype) for k, a in tensors.items() if a.dtype.kind == "f" and not (statistics and k.endswith(statistics))}
    config = dict(model.config.hf)
    config.pop("quantization_config", None)
    for spec in kernel_types():
        if spec.hf_config is not None and (quantization := spec.hf_config(tensors)) is not None:
            config["quantization_config"] = quantization
    config["dtype"] = "bfloat16" if "bfloat16" in dtypes else ("float16" if "float16" in dtypes else "float32")
    records = kernel_records(params, record_extra) if records is None else records

    def fill(staging: Path) -> None:
        write_tensor_file(tensors, staging / "model.safetensors")
        for name, record in records.items():
            (staging / name).write_text(json.dumps(record, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))

    return write_directory(out_dir, fill, overwrite)
