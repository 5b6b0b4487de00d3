"""Load llama-architecture GGUF files (llama.cpp's format) into lowrax.

The config is rebuilt from the GGUF metadata, tensors are dequantized one at
a time with the `gguf` package (numpy only), and llama.cpp's permutation of
the Q and K projection rows (it interleaves the two rotary halves of every
head) is undone so the weights match the HF layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowrax.errors import CheckpointError, NotAModelError, UnsupportedModelError

# HF key (with {i} for the layer) -> GGUF tensor name.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def gguf_name(hf_key: str) -> str | None:
    """The GGUF tensor name of an HF llama key, or None if GGUF has no such tensor."""
    parts = hf_key.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        pattern = ".".join(parts[:2] + ["{i}"] + parts[3:])
        name = GGUF_NAMES.get(pattern)
        return name.replace("{i}", parts[2]) if name else None
    return GGUF_NAMES.get(hf_key)


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation on an (out, in) weight.

    llama.cpp stores each head's rows as interleaved pairs (x0, x_half, x1, ...)
    where HF keeps the two rotary halves contiguous; this swaps them back.
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _metadata(reader) -> dict:
    out = {}
    for name, value in reader.fields.items():
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        try:
            out[name] = value.contents()
        except Exception:  # noqa: BLE001 - unreadable metadata we do not need
            continue
    return out


def hf_config_from_gguf(meta: dict, tensor_names: set[str], vocab_size: int) -> dict:
    """An HF LlamaConfig-style dict built from llama.cpp's metadata keys."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported; lowrax reads GGUF files of: llama")
    a = f"{arch}."
    for key in ("attention.head_count", "embedding_length", "feed_forward_length", "block_count"):
        if not isinstance(meta.get(a + key), (int, np.integer)) or int(meta[a + key]) < 1:
            raise NotAModelError(f"the GGUF metadata's {a + key} is {meta.get(a + key, 'missing')!r}; a llama GGUF "
                                 "file gives it as a positive integer (the file is incomplete or damaged)")
    heads = int(meta[a + "attention.head_count"])
    hidden = int(meta[a + "embedding_length"])
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(meta.get(a + "vocab_size", vocab_size)),
        "hidden_size": hidden,
        "intermediate_size": int(meta[a + "feed_forward_length"]),
        "num_hidden_layers": int(meta[a + "block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(a + "attention.head_count_kv", heads)),
        "head_dim": int(meta.get(a + "attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(a + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(a + "context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    scaling_type = meta.get(a + "rope.scaling.type")
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[a + "rope.scaling.factor"])}
    elif scaling_type not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {scaling_type!r} is not supported (supported: linear)")
    return config


def load_gguf(path: Path, dtype, progress: bool = True, model_factory=None, quant=None, mesh=None):
    """(model, params) from a llama GGUF file, dequantizing tensor by tensor."""
    import gguf

    from lowrax.io.gguf_reader import open_gguf
    from lowrax.io.hf_checkpoint import load_tensors
    from lowrax.models import model_from_hf_config

    try:
        reader = open_gguf(path)
    except Exception as e:  # noqa: BLE001 - the gguf package raises bare ValueErrors
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e
    tensors = {t.name: t for t in reader.tensors}
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents()) if "tokenizer.ggml.tokens" in reader.fields else 0
    try:
        hf = hf_config_from_gguf(_metadata(reader), set(tensors), vocab)
    except NotAModelError as e:
        raise NotAModelError(f"{path}: {e}") from None
    model = (model_factory or model_from_hf_config)(hf)
    c = model.config

    def read(name: str, hf_key: str):
        t = tensors[name]
        weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        weight = weight.reshape(tuple(int(n) for n in reversed(t.shape)))
        if hf_key.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rows(weight, c.num_heads)
        elif hf_key.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rows(weight, c.num_kv_heads)
        return weight

    def lookup(hf_key):
        name = gguf_name(hf_key)
        if name is None or name not in tensors:
            return None
        shape = tuple(int(n) for n in reversed(tensors[name].shape))
        return shape, lambda: read(name, hf_key)

    known = {gguf_name(t.hf_key) for t in model.tensors()}
    unused_names = [n for n in tensors if n not in known and not n.startswith("rope_freqs")]
    params = load_tensors(model, lookup, [], dtype, str(path), progress, quant, mesh)
    if unused_names:
        import logging

        logging.getLogger(__name__).warning("%s: ignored GGUF tensors %s", path, unused_names[:5])
    return model, params
