"""One tiny random model of every registered family, with inputs, for the conformance suite.

Configs come from transformers' own config classes (so every field a family reads is there);
weights are random arrays laid out by the family's tensor table (no torch model is built).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from lowrax.core.tables import set_path
from lowrax.models import FAMILIES, model_from_hf_config

transformers = pytest.importorskip("transformers")

DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ENCODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, num_labels=2, architectures=None)


def hf_config(model_type: str) -> dict:
    """A small config.json of `model_type`, written by transformers' config class."""
    if model_type in ("llama", "mistral", "qwen2", "phi3"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "phi3": transformers.Phi3Config}[model_type]
        config = cls(**DECODER, tie_word_embeddings=model_type != "phi3")
    elif model_type == "gemma2":
        config = transformers.Gemma2Config(**DECODER, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
    elif model_type == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                         eos_token_id=2)
    elif model_type in ("bert", "roberta"):
        cls = transformers.BertConfig if model_type == "bert" else transformers.RobertaConfig
        name = "BertForSequenceClassification" if model_type == "bert" else "RobertaForSequenceClassification"
        config = cls(**{**ENCODER, "architectures": [name]}, **({"pad_token_id": 1} if model_type == "roberta" else {}))
    elif model_type == "t5":
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                       feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                       decoder_start_token_id=0, relative_attention_num_buckets=8)
    elif model_type == "vit":
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=48, image_size=16, patch_size=4, num_labels=3,
                                        architectures=["ViTForImageClassification"])
    else:
        raise KeyError(f"no tiny config for the registered family {model_type!r}: add one to tests/conformance_models.py")
    return config.to_dict()


@functools.lru_cache(maxsize=None)
def tiny(model_type: str):
    """(model, random float32 params, inputs) of a tiny `model_type` model; cached per process."""
    model = model_from_hf_config(hf_config(model_type))
    rng = np.random.default_rng(0)
    params: dict = {}
    for t in model.tensors():
        if t.path[-1] == "scale":  # norms near 1 (Gemma's are added to 1: near 0 there)
            value = (0.0 if model_type == "gemma2" else 1.0) + 0.05 * rng.normal(size=t.shape)
        else:
            value = 0.1 * rng.normal(size=t.shape)
        set_path(params, t.path, jnp.asarray(value, jnp.float32))
    return model, params, _inputs(model, rng)


def _inputs(model, rng) -> dict:
    if model.is_image_model:
        return {"pixel_values": jnp.asarray(rng.normal(size=(2, 3, 16, 16)), jnp.float32)}
    ids = jnp.asarray(rng.integers(2, 60, (2, 7)))
    mask = jnp.asarray([[1] * 7, [0, 0] + [1] * 5] if model.is_causal_lm else [[1] * 7, [1] * 5 + [0, 0]])
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model.is_seq2seq:
        inputs["decoder_input_ids"] = jnp.asarray(rng.integers(2, 60, (2, 5)))
    return inputs


def outputs(model, params, inputs) -> np.ndarray:
    """What the model computes for `inputs`, as one float32 array (logits, or an encoder's states)."""
    out = model.apply(params, **inputs)
    if hasattr(out, "last_hidden_state"):  # an encoder: its states, and its head's logits when it has one
        parts = [out.last_hidden_state.reshape(-1)] + ([out.logits.reshape(-1)] if out.logits is not None else [])
        return np.asarray(jnp.concatenate(parts), np.float32)
    return np.asarray(out, np.float32)


def families() -> list[str]:
    return sorted(FAMILIES)
