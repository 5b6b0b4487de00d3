"""PEFT's formats of prompt tuning, P-tuning and prefix tuning.

PEFT's file for all three holds one tensor, `prompt_embeddings`: what the encoder produces
(the virtual tokens' embeddings, or the flattened prefix), not the encoder itself, and PEFT
loads it in inference mode as a plain table. lowrax does the same: a loaded P-tuning adapter
is a `PromptTable`, a loaded prefix a `PrefixEncoder` without projection, and `import-peft`
continues them as prompt tuning and prefix tuning of those tables.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from lowrax.adapters.prompt.build import dims
from lowrax.adapters.prompt.config import PrefixTuningConfig, PromptTuningConfig
from lowrax.adapters.prompt.node import PrefixEncoder, PromptTable
from lowrax.adapters.registry import PeftFormat, register_peft_format
from lowrax.core.node import VIRTUAL_TOKENS_KEY
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import OMIT

TENSOR = "prompt_embeddings"


def _common_fields(node, model) -> dict:
    d = dims(model)
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

register_peft_format(PeftFormat(peft_type="PROMPT_TUNING", write=write_prompt, read=read_prompt,
                                to_config=prompt_to_config, modules=NONE, modules_to_save_prefix="base_model."))
register_peft_format(PeftFormat(peft_type="P_TUNING", write=write_prompt, read=read_prompt,
                                to_config=prompt_to_config, modules=NONE, modules_to_save_prefix="base_model."))
register_peft_format(PeftFormat(peft_type="PREFIX_TUNING", write=write_prefix, read=read_prefix,
                                to_config=prefix_to_config, modules=NONE, modules_to_save_prefix="base_model."))
