"""Prompt tuning, P-tuning and prefix tuning as registered methods, and their PEFT formats.

`wrap(params, cfg, key, model=model)` adds the method's node under the tree's top-level
key `prompt_encoder`, initialised as PEFT initialises it. PEFT's file for all three holds
one tensor, `prompt_embeddings`: what the encoder produces (the virtual tokens'
embeddings, or the flattened prefix), not the encoder itself, and PEFT loads it in
inference mode as a plain table. lowrax does the same: a loaded P-tuning adapter is a
`PromptTable`, a loaded prefix a `PrefixEncoder` without projection, and `import-peft`
continues them as prompt tuning and prefix tuning of those tables.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.adapters.init import kaiming_uniform, torch_linear
from lowrax.core.node import VIRTUAL_TOKENS_KEY
from lowrax.adapters.prompt.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from lowrax.adapters.prompt.nodes import PrefixEncoder, PromptEncoder, PromptTable, refuse_encoder_prefix
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import OMIT

TENSOR = "prompt_embeddings"


def _dims(model) -> dict:
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
    d, v = _dims(model), cfg.num_virtual_tokens
    if cfg.prompt_tuning_init == "TEXT":
        table = _text_init(params, cfg, model, v, adapter_dtype)
    elif cfg.prompt_tuning_init == "SAMPLE_VOCAB":
        words = model.word_embedding_table(params)
        table = jnp.take(words, jax.random.randint(key, (v,), 0, words.shape[0]), axis=0).astype(adapter_dtype)
    else:  # torch.nn.Embedding's init
        table = jax.random.normal(key, (v, d["hidden"])).astype(adapter_dtype)
    return PromptTable(embeddings=table)


def build_p_tuning(params, cfg: PromptEncoderConfig, key, adapter_dtype, model) -> PromptEncoder:
    d = _dims(model)
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
    d, v = _dims(model), cfg.num_virtual_tokens
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


# --- PEFT's format --------------------------------------------------------------------------

def _common_fields(node, model) -> dict:
    d = _dims(model)
    return {"num_virtual_tokens": node.num_virtual_tokens, "num_transformer_submodules": 1,
            "num_layers": d["layers"], "token_dim": d["hidden"], "num_attention_heads": model.config.num_heads,
            "target_modules": OMIT, "inference_mode": True}  # prompt-learning configs have no target_modules


def _one_node(nodes: dict):
    if set(nodes) != {VIRTUAL_TOKENS_KEY}:
        raise LowraxError(f"a prompt-learning adapter lives under the tree's {VIRTUAL_TOKENS_KEY!r} key; found "
                          f"{', '.join(sorted(nodes))}")
    return nodes[VIRTUAL_TOKENS_KEY]


def _needs_model(model, peft_type):
    if model is None:
        raise LowraxError(f"saving a {peft_type} adapter needs the model (save_peft(params, out_dir, model)): "
                          "PEFT's config records its dimensions")


def write_prompt(nodes: dict, params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    node = _one_node(nodes)
    _needs_model(model, node.peft_type)
    tensors = {TENSOR: np.asarray(node.prompt_embeddings(), np.float32)}
    fields = _common_fields(node, model)
    if node.peft_type == "PROMPT_TUNING":
        fields |= {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                   "tokenizer_kwargs": None}
    else:
        fields |= {"encoder_reparameterization_type": "LSTM" if node.lstm_head is not None else "MLP",
                   "encoder_hidden_size": int(node.mlp_head["0"]["kernel"].shape[1]) // (2 if node.lstm_head else 1),
                   "encoder_num_layers": len(node.lstm_head or {}) // 2 or 2, "encoder_dropout": node.encoder_dropout}
    return tensors, fields


def write_prefix(nodes: dict, params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    node = _one_node(nodes)
    _needs_model(model, node.peft_type)
    fields = _common_fields(node, model) | {
        # PEFT's grouped-query-attention convention: the key/value heads and their width
        "token_dim": node.kv_heads * node.head_dim, "num_attention_heads": node.kv_heads,
        "prefix_projection": False, "encoder_hidden_size": node.kv_heads * node.head_dim, "init_weights": None}
    return {TENSOR: np.asarray(node.flat(), np.float32)}, fields


def _table(tensors: dict, config: dict, width: int | None, what: str) -> np.ndarray:
    if TENSOR not in tensors:
        raise CheckpointError(f"{config.get('peft_type')} adapter lacks its {TENSOR} tensor")
    table = np.asarray(tensors[TENSOR], np.float32)
    v = config.get("num_virtual_tokens")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError("this adapter is for an encoder-decoder model (num_transformer_submodules=2); lowrax "
                              "runs prompt learning on decoders")
    if table.ndim != 2 or table.shape[0] != v or (width is not None and table.shape[1] != width):
        raise CheckpointError(f"{TENSOR} has shape {table.shape}, expected ({v}, {width or '...'}) ({what})")
    return table


def read_prompt(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    table = _table(tensors, config, config.get("token_dim"), "num_virtual_tokens x token_dim")
    return {}, {VIRTUAL_TOKENS_KEY: PromptTable(embeddings=jnp.asarray(table, adapter_dtype))}, {TENSOR}


def read_prefix(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    layers, heads, token_dim = (int(config[k]) for k in ("num_layers", "num_attention_heads", "token_dim"))
    table = _table(tensors, config, layers * 2 * token_dim, "num_virtual_tokens x num_layers * 2 * token_dim")
    node = PrefixEncoder(embeddings=jnp.asarray(table, adapter_dtype), num_layers=layers, kv_heads=heads,
                         head_dim=token_dim // heads)
    return {}, {VIRTUAL_TOKENS_KEY: node}, {TENSOR}


def prompt_to_config(config: dict):
    # P-tuning's file holds the encoder's output only: it continues as prompt tuning of it
    return "prompt_tuning", PromptTuningConfig(num_virtual_tokens=int(config["num_virtual_tokens"]),
                                               modules_to_save=tuple(config.get("modules_to_save") or ()))


def prefix_to_config(config: dict):
    # with or without PEFT's projection, the file holds the prefix itself: it continues unprojected
    return "prefix_tuning", PrefixTuningConfig(num_virtual_tokens=int(config["num_virtual_tokens"]),
                                               modules_to_save=tuple(config.get("modules_to_save") or ()))


NONE = lambda params: {}  # noqa: E731  (these methods adapt no module: their node goes under prompt_encoder)

register_method(AdapterMethod(name="prompt_tuning", config=PromptTuningConfig, build=None,
                              build_virtual=build_prompt_tuning))
register_method(AdapterMethod(name="p_tuning", config=PromptEncoderConfig, build=None, build_virtual=build_p_tuning))
register_method(AdapterMethod(name="prefix_tuning", config=PrefixTuningConfig, build=None,
                              build_virtual=build_prefix_tuning))
register_peft_format(PeftFormat(peft_type="PROMPT_TUNING", write=write_prompt, read=read_prompt,
                                to_config=prompt_to_config, modules=NONE, modules_to_save_prefix="base_model."))
register_peft_format(PeftFormat(peft_type="P_TUNING", write=write_prompt, read=read_prompt,
                                to_config=prompt_to_config, modules=NONE, modules_to_save_prefix="base_model."))
register_peft_format(PeftFormat(peft_type="PREFIX_TUNING", write=write_prefix, read=read_prefix,
                                to_config=prefix_to_config, modules=NONE, modules_to_save_prefix="base_model."))
