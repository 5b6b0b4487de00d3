"""Prompt tuning, P-tuning and prefix tuning as registered methods (their PEFT formats: peft.py).

`wrap(params, cfg, key, model=model)` adds the method's node under the tree's top-level
key `prompt_encoder`, initialised as PEFT initialises it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lowrax.adapters.init import kaiming_uniform, torch_linear
from lowrax.adapters.prompt.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from lowrax.adapters.prompt.node import PrefixEncoder, PromptEncoder, PromptTable, refuse_encoder_prefix
from lowrax.adapters.registry import AdapterMethod, register_method
from lowrax.errors import LowraxError

def dims(model) -> dict:
    """PEFT's token_dim / num_layers / num_attention_heads for this model (prefix tuning's are
    the key/value heads', as PEFT sets them for grouped-query attention)."""
    if getattr(model, "is_causal_lm", False):
        kv_heads, head_dim = model.kv_shape(1, 1)[2:]
    elif model.model_type == "bert":
        kv_heads, head_dim = model.config.num_heads, model.config.hidden_size // model.config.num_heads
    else:
        raise LowraxError(f"prompt-learning methods run on causal LMs and BERT encoders, not {model.model_type!r} "
                          "(RoBERTa numbers positions from its padding index, which PEFT's virtual-token path does not)")
    return {"hidden": model.config.hidden_size, "layers": model.config.num_layers, "kv_heads": kv_heads,
            "head_dim": head_dim}


def _text_init(params, cfg: PromptTuningConfig, model, v: int, dtype) -> jnp.ndarray:
    """PEFT's TEXT init: the embeddings of the text's tokens (special tokens included, as the
    tokenizer adds them), repeated or cut to v."""
    from lowrax.models.pretrained import load_tokenizer

    if cfg.tokenizer_name_or_path is None:
        raise LowraxError("PromptTuningConfig.prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local model "
                          "directory or GGUF file whose tokenizer encodes prompt_tuning_init_text)")
    ids = load_tokenizer(cfg.tokenizer_name_or_path)(cfg.prompt_tuning_init_text)["input_ids"]
    ids = (ids * math.ceil(v / len(ids)))[:v]
    return jnp.take(model.word_embedding_table(params), jnp.asarray(ids), axis=0).astype(dtype)


def build_prompt_tuning(params, cfg: PromptTuningConfig, key, adapter_dtype, model) -> PromptTable:
    d, v = dims(model), cfg.num_virtual_tokens
    if cfg.prompt_tuning_init == "TEXT":
        table = _text_init(params, cfg, model, v, adapter_dtype)
    elif cfg.prompt_tuning_init == "SAMPLE_VOCAB":
        words = model.word_embedding_table(params)
        table = jnp.take(words, jax.random.randint(key, (v,), 0, words.shape[0]), axis=0).astype(adapter_dtype)
    else:  # torch.nn.Embedding's init
        table = jax.random.normal(key, (v, d["hidden"])).astype(adapter_dtype)
    return PromptTable(embeddings=table)


def build_p_tuning(params, cfg: PromptEncoderConfig, key, adapter_dtype, model) -> PromptEncoder:
    d = dims(model)
    hidden, width = d["hidden"], cfg.encoder_hidden_size or d["hidden"]
    keys = iter(jax.random.split(key, 4 + 2 * cfg.encoder_num_layers))
    table = jax.random.normal(next(keys), (cfg.num_virtual_tokens, hidden)).astype(adapter_dtype)
    if cfg.encoder_reparameterization_type == "MLP":
        head = {"0": torch_linear(next(keys), hidden, width, adapter_dtype),
                "2": torch_linear(next(keys), width, width, adapter_dtype),
                "4": torch_linear(next(keys), width, hidden, adapter_dtype)}
        return PromptEncoder(embeddings=table, mlp_head=head)
    lstm = {}
    for i in range(cfg.encoder_num_layers):  # torch's LSTM init: every tensor U(-1/sqrt(h), 1/sqrt(h))
        d_in = hidden if i == 0 else 2 * width
        for suffix in ("", "_reverse"):
            k = jax.random.split(next(keys), 3)
            lstm[f"l{i}{suffix}"] = {"w_ih": kaiming_uniform(k[0], (d_in, 4 * width), width, adapter_dtype),
                                     "w_hh": kaiming_uniform(k[1], (width, 4 * width), width, adapter_dtype),
                                     # torch's two biases, b_ih + b_hh, summed
                                     "bias": (kaiming_uniform(k[2], (4 * width,), width, adapter_dtype)
                                              + kaiming_uniform(jax.random.fold_in(k[2], 1), (4 * width,), width,
                                                                adapter_dtype))}
    head = {"0": torch_linear(next(keys), 2 * width, 2 * width, adapter_dtype),
            "2": torch_linear(next(keys), 2 * width, hidden, adapter_dtype)}
    return PromptEncoder(embeddings=table, mlp_head=head, lstm_head=lstm, encoder_dropout=cfg.encoder_dropout)


def build_prefix_tuning(params, cfg: PrefixTuningConfig, key, adapter_dtype, model) -> PrefixEncoder:
    refuse_encoder_prefix(model)
    d, v = dims(model), cfg.num_virtual_tokens
    flat = d["layers"] * 2 * d["kv_heads"] * d["head_dim"]
    shape = dict(num_layers=d["layers"], kv_heads=d["kv_heads"], head_dim=d["head_dim"])
    zero = cfg.init_weights == "zero"
    if not cfg.prefix_projection:
        table = jnp.zeros((v, flat), adapter_dtype) if zero else jax.random.normal(key, (v, flat)).astype(adapter_dtype)
        return PrefixEncoder(embeddings=table, **shape)
    # PEFT projects from its token_dim, which for grouped-query attention is kv_heads * head_dim
    token_dim = d["kv_heads"] * d["head_dim"]
    width = cfg.encoder_hidden_size or token_dim
    k = jax.random.split(key, 3)
    last = torch_linear(k[2], width, flat, adapter_dtype)
    if zero:
        last = jax.tree.map(jnp.zeros_like, last)
    return PrefixEncoder(embeddings=jax.random.normal(k[0], (v, token_dim)).astype(adapter_dtype),
                         transform={"0": torch_linear(k[1], token_dim, width, adapter_dtype), "2": last}, **shape)


# Virtual tokens change what the model computes from the start: no identity at init.
register_method(AdapterMethod(name="prompt_tuning", config=PromptTuningConfig, build=None,
                              build_virtual=build_prompt_tuning, identity_at_init=False,
                              examples={"prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=3)}))
register_method(AdapterMethod(name="p_tuning", config=PromptEncoderConfig, build=None, build_virtual=build_p_tuning,
                              identity_at_init=False,
                              examples={"p_tuning": lambda: PromptEncoderConfig(num_virtual_tokens=3,
                                                                               encoder_hidden_size=16)}))
register_method(AdapterMethod(name="prefix_tuning", config=PrefixTuningConfig, build=None,
                              build_virtual=build_prefix_tuning, identity_at_init=False,
                              examples={"prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=3)}))
