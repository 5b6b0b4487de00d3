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
from typing import Callable, Iterable

import jax
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from lowrax.errors import CheckpointError
from lowrax.io import tables
from lowrax.io.atomic import write_directory
from lowrax.models.base import Model

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
    pruned: dict | None = None,
) -> dict:
    """Build the parameter tree from a checkpoint, one tensor at a time.

    `lookup(hf_key)` returns (shape, read) for a key present in the checkpoint
    or None. Every missing or misshapen tensor is reported in one error. With
    `quant` (a QuantConfig) linear kernels are quantized to NF4 as they are read,
    so the full-precision model is never in memory at once. With `mesh` each tensor goes
    straight into its shards (`lowrax.dist.sharding` rules). `pruned`: {dotted module name: pattern}
    of the kernels pruned (a directory's pruning.json): they load as SparseKernels, their zeros
    taken as the mask before any quantization.
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

    from lowrax.quant import nf4

    tree: dict = {}
    for t, read in tqdm(resolved, desc=f"loading {Path(source).name}", unit="tensor", disable=not progress, leave=False):
        value = read()  # in the HF layout: an array, or an NF4Tensor from a 4-bit checkpoint
        pattern = (pruned or {}).get(".".join(t.path[:-1]))
        kept = None if pattern is None else _kept_weights(value, t)
        if quant is not None and not isinstance(value, nf4.NF4Tensor) and _quantizable(t, quant):
            value = nf4.quantize(jax.numpy.asarray(value.astype(dtype)), quant.blocksize, quant.double_quant)
        value = t.from_hf(value)
        if not isinstance(value, nf4.NF4Tensor) and (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
            value = value.astype(dtype)
        value = jax.device_put(value, None if mesh is None else _sharding_of(model, mesh, t.path, value))
        if kept is not None:
            from lowrax.pruning.sparse import SparseKernel

            value = SparseKernel(kernel=value, mask=jax.device_put(kept, None if mesh is None else _sharding_of(
                model, mesh, t.path, kept)), pattern=pattern)
        tables.set_path(tree, t.path, value)
    return tree


def _kept_weights(value, t: tables.Tensor) -> np.ndarray:
    """The mask (True = kept) of a pruned weight read in the HF layout, in the tree's layout."""
    from lowrax.quant import nf4

    if isinstance(value, nf4.NF4Tensor):  # a 4-bit file: zero codes decode to exactly zero
        dense = np.asarray(nf4.dequantize(t.from_hf(value)))
        return dense != 0
    return t.from_hf(np.asarray(value) != 0)


PRUNING_RECORD = "pruning.json"


def read_pruned_modules(directory: Path) -> dict[str, str]:
    """{dotted module name: pattern} of the pruned kernels a model directory records (empty: never pruned)."""
    path = Path(directory) / PRUNING_RECORD
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
        modules = record["modules"]
        return {name: str(entry.get("pattern", "unstructured")) for name, entry in modules.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a pruning record (expected {{\"modules\": {{name: {{\"pattern\", "
                              f"\"sparsity\"}}}}}}): {e}") from e


def pruning_record(params: dict, extra: dict | None = None) -> dict | None:
    """The pruning.json a tree with SparseKernels is saved with (None without any)."""
    from lowrax.pruning.sparse import sparse_modules

    modules = sparse_modules(params)
    if not modules:
        return None
    return {"modules": {name: {"pattern": k.pattern, "sparsity": round(k.sparsity(), 6)}
                        for name, k in sorted(modules.items())}, **(extra or {})}


def _sharding_of(model, mesh, path: tuple[str, ...], value):
    """The sharding the rules give one parameter (an array or an NF4Tensor) at `path`."""
    from lowrax.dist.sharding import param_shardings

    single: dict = {}
    tables.set_path(single, path, value)
    return tables.get_path(param_shardings(single, model, mesh), path)


def _quantizable(t: tables.Tensor, quant) -> bool:
    """A 2-D linear kernel outside the QuantConfig's skip_modules."""
    return t.path[-1] == "kernel" and len(t.shape) == 2 and not any(
        skip in name for name in t.path for skip in quant.skip_modules)


def load_hf_directory(model: Model, directory: Path, dtype, progress: bool = True, quant=None, mesh=None) -> dict:
    """The parameter tree of an HF model directory (safetensors, single or sharded).

    Weights saved 4-bit by transformers + bitsandbytes stay NF4 (their statistics are
    read with them, so they are not reported as unused tensors).
    """
    from lowrax.io.safetensors_dir import SafetensorsDir
    from lowrax.quant import bnb_format

    files = SafetensorsDir(directory)

    def lookup(key):
        if key not in files:
            return None
        if bnb_format.is_quantized(key, files.__contains__):
            shape = tuple(bnb_format.read_state(files.get(key + bnb_format.STATE_SUFFIX))["shape"])
            return shape, lambda: bnb_format.nf4_from_tensors(key, files.get, files.__contains__)
        return files.shape(key), lambda: files.get(key)

    tensors = [k for k in files.keys() if not k.endswith(bnb_format.STATISTIC_SUFFIXES)]
    return load_tensors(model, lookup, tensors, dtype, str(directory), progress, quant, mesh,
                        pruned=read_pruned_modules(directory))


def tree_to_hf_tensors(params: dict, model: Model, keep_nf4: bool = False) -> dict[str, np.ndarray]:
    """HF-keyed numpy arrays for every tensor of the tree, in HF layout.

    NF4 weights are dequantized, or with keep_nf4 written in bitsandbytes' 4-bit layout.
    """
    from lowrax.io.tables import TRANSPOSE
    from lowrax.quant import bnb_format
    from lowrax.pruning.sparse import is_sparse
    from lowrax.quant.nf4 import NF4Tensor, dequantize

    out = {}
    for t in model.tensors():
        try:
            leaf = tables.get_path(params, t.path)
        except KeyError:
            if t.optional:
                continue
            raise CheckpointError(f"params have no {'/'.join(t.path)} (HF key {t.hf_key})") from None
        if is_sparse(leaf):  # a pruned kernel: its zeros are the sparsity HF files carry
            leaf = leaf.kernel
        if isinstance(leaf, NF4Tensor) and keep_nf4:
            if leaf.transposed != (t.layout == TRANSPOSE):
                raise CheckpointError(f"{'/'.join(t.path)} is stored in NF4 in a layout other than its HF weight's")
            out.update(bnb_format.nf4_to_tensors(t.hf_key, leaf))
            continue
        if isinstance(leaf, NF4Tensor):  # plain HF safetensors hold dequantized weights
            leaf = dequantize(leaf)
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
                      keep_nf4: bool = False, pruning_extra: dict | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (+ tokenizer files) that transformers loads.

    A tree with pruned kernels (SparseKernels) also gets `pruning.json` (each pruned module's
    pattern and sparsity, plus `pruning_extra`): loading the directory makes those kernels
    SparseKernels again, so the sparsity survives LoRA recovery and merging.

    Written to a temporary sibling directory and renamed into place, so a crash
    never leaves a half-written model behind.
    """
    tensors = tree_to_hf_tensors(params, model, keep_nf4)
    dtypes = {str(a.dtype) for k, a in tensors.items() if a.dtype.kind == "f" and not k.endswith((".absmax", "_map"))}
    config = dict(model.config.hf)
    config.pop("quantization_config", None)
    from lowrax.quant.bnb_format import STATE_SUFFIX, quantization_config

    if any(k.endswith(STATE_SUFFIX) for k in tensors):
        config["quantization_config"] = quantization_config(any(k.endswith(".nested_absmax") for k in tensors))
    config["dtype"] = "bfloat16" if "bfloat16" in dtypes else ("float16" if "float16" in dtypes else "float32")

    record = pruning_record(params, pruning_extra)

    def fill(staging: Path) -> None:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if record is not None:
            (staging / PRUNING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))

    return write_directory(out_dir, fill, overwrite)
