"""The model a run trains: its base (dtype, NF4, a classification head) wrapped with its adapter
method, rebuilt identically by `lowrax.train.runs` to restore a checkpoint into."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowrax.adapters.wrap import wrap
from lowrax.errors import LowraxError
from lowrax.models.pretrained import load_pretrained, resolve_model_path
from lowrax.train.config import TrainConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(cfg: TrainConfig, mesh=None):
    """(model, base params, adapter-wrapped params) as a run with this config trains them
    (with `mesh`: the base loaded straight into its shards).

    The adapter initialisation depends only on `train.seed`, so a run directory's
    checkpoint always restores into the same structure (`lowrax.train.runs`).
    """
    key = jax.random.key(cfg.train.seed)
    model, base = _load_model(cfg, jax.random.fold_in(key, 1), mesh)
    adapter_cfg = cfg.adapter
    if cfg.model.task == "classification" and not adapter_cfg.modules_to_save:
        adapter_cfg = dataclasses.replace(adapter_cfg, modules_to_save=("classifier",))
    if hasattr(adapter_cfg, "total_step") and adapter_cfg.total_step is None:
        # a method scheduled over the run's length (AdaLoRA's rank budget)
        adapter_cfg = dataclasses.replace(adapter_cfg, total_step=cfg.train.steps)
    if getattr(adapter_cfg, "prompt_tuning_init", None) == "TEXT" and adapter_cfg.tokenizer_name_or_path is None:
        # prompt tuning from a text: the model's own tokenizer encodes it
        adapter_cfg = dataclasses.replace(adapter_cfg, tokenizer_name_or_path=str(resolve_model_path(cfg.model.path)))
    return model, base, wrap(base, adapter_cfg, jax.random.fold_in(key, 2), model=model)


def _load_model(cfg: TrainConfig, key, mesh=None):
    dtype = DTYPES.get(cfg.model.dtype)
    if dtype is None:
        raise LowraxError(f"model.dtype must be one of {', '.join(DTYPES)}, got {cfg.model.dtype!r}")
    quant = None
    if cfg.model.quantize is not None:
        from lowrax.quant.tree import QuantConfig

        quant = QuantConfig(cfg.model.quantize, cfg.model.quant_blocksize, cfg.model.double_quant)
    model, params = load_pretrained(cfg.model.path, dtype=dtype, quantize=quant, mesh=mesh)
    if cfg.model.task == "classification":
        if not model.classifies:
            raise LowraxError(f"model.task=classification needs an encoder (bert, roberta, vit); got {model.model_type}")
        if "classifier" not in params:
            if not cfg.model.num_labels:
                raise LowraxError("model.task=classification on an encoder without a head needs model.num_labels")
            model, params = model.with_classification_head(params, cfg.model.num_labels, key)
    elif cfg.model.task == "seq2seq":
        if not model.is_seq2seq:
            raise LowraxError(f"model.task=seq2seq needs an encoder-decoder (t5); got {model.model_type}")
    elif cfg.model.task != "causal_lm":
        raise LowraxError(f"model.task must be causal_lm, classification or seq2seq, got {cfg.model.task!r}")
    elif model.is_seq2seq:
        raise LowraxError(f"{model.model_type} is an encoder-decoder: train it with model.task=seq2seq")
    elif not model.is_causal_lm:
        raise LowraxError(f"model.task=causal_lm needs a causal LM; {model.model_type} is an encoder")
    return model, params
