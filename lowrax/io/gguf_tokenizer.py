"""The tokenizer a GGUF file describes, built without torch.

transformers' own `AutoTokenizer.from_pretrained(..., gguf_file=...)` reads the
metadata through a module that needs torch; lowrax reads it with the `gguf`
package and hands it to transformers' GGUF tokenizer converter (the same
vocabulary, merges, pre-tokenizer and special tokens), so the runtime needs no
torch. The result is a transformers fast tokenizer with the file's chat template.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

from lowrax.errors import CheckpointError

_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}


def _converter():
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # transformers 4.x keeps them in integrations.ggml
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def load_gguf_tokenizer(path: str | Path):
    """A transformers fast tokenizer from a GGUF file's `tokenizer.*` metadata (a fresh copy of
    the one built for this file in this process: building it takes seconds)."""
    stat = os.stat(path)
    return copy.deepcopy(_built(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=2)
def _built(path: str, size: int, mtime_ns: int):
    from transformers import PreTrainedTokenizerFast

    from lowrax.io.gguf_reader import open_gguf

    mapping, convert = _converter()
    reader = open_gguf(path)
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.") or name == "general.architecture":
            meta[name] = field.contents()
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{path} carries no tokenizer (no tokenizer.ggml.tokens metadata)")
    tokenizer_dict = {name: meta[f"tokenizer.{key}"] for key, name in mapping["tokenizer"].items() if f"tokenizer.{key}" in meta}
    config = {name: meta[f"tokenizer.{key}"] for key, name in mapping["tokenizer_config"].items() if f"tokenizer.{key}" in meta}
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece vocabularies
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[name] = tokens[int(token_id)]
    backend, extra = convert(meta["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
