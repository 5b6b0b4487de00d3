"""The models' own dropout: applied in training steps at the config's rates (as transformers' train
mode), deterministic given the step's key, absent outside a step (evaluation is transformers' eval
mode), and redrawn identically when remat recomputes a layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
from lowrax.core.dropout import dropped_out, with_model_dropout
from lowrax.models import model_from_hf_config
from lowrax.train.step import init_state, make_train_step

BERT = {"model_type": "bert", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 32, "hidden_dropout_prob": 0.2,
        "attention_probs_dropout_prob": 0.2, "num_labels": 2, "architectures": ["BertForSequenceClassification"]}
GPT2 = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32,
        "embd_pdrop": 0.2, "attn_pdrop": 0.2, "resid_pdrop": 0.2}
VIT = {"model_type": "vit", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
       "image_size": 8, "patch_size": 4, "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2, "num_labels": 2,
       "architectures": ["ViTForImageClassification"]}

T5 = {"model_type": "t5", "vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 24, "num_layers": 2, "num_heads": 2,
      "feed_forward_proj": "gated-gelu", "dropout_rate": 0.2, "decoder_start_token_id": 0, "pad_token_id": 0}


def _random(config):
    model = model_from_hf_config(config)
    rng = np.random.default_rng(0)
    from lowrax.core.tables import set_path

    params: dict = {}
    for t in model.tensors():
        value = np.ones(t.shape) if t.path[-1] == "scale" else 0.3 * rng.normal(size=t.shape)
        set_path(params, t.path, jnp.asarray(value, jnp.float32))
    return model, params


def _inputs(config):
    if config["model_type"] == "vit":
        return (jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 8, 8)), jnp.float32),)
    return (jnp.asarray(np.random.default_rng(1).integers(1, 64, (2, 6))),)


def _output(model, params, inputs):
    extra = {"decoder_input_ids": inputs[0][:, :4]} if model.model_type == "t5" else {}
    out = model.apply(params, *inputs, **extra)
    return np.asarray(out.last_hidden_state if hasattr(out, "last_hidden_state") else out)


@pytest.mark.parametrize("config", [BERT, GPT2, VIT, T5], ids=["bert", "gpt2", "vit", "t5"])
def test_dropout_only_inside_a_step_and_deterministic_given_its_key(config):
    model, params = _random(config)
    inputs = _inputs(config)
    plain = _output(model, params, inputs)
    key = jax.random.key(3)
    once, again = (_output(model, with_model_dropout(params, key), inputs) for _ in range(2))
    other = _output(model, with_model_dropout(params, jax.random.key(4)), inputs)
    np.testing.assert_array_equal(once, again)  # a pure function of the key
    assert np.abs(once - plain).max() > 1e-3 and np.abs(once - other).max() > 1e-3
    quiet = {k: v for k, v in config.items() if "drop" not in k}
    quiet.update({k: 0.0 for k in config if "drop" in k})
    model0, _ = _random(quiet)
    np.testing.assert_array_equal(_output(model0, with_model_dropout(params, key), inputs), plain)  # rate 0: none


def test_dropped_out_zeroes_the_rate_and_keeps_the_mean():
    x = jnp.ones((200_000,))
    y = np.asarray(dropped_out(x, 0.25, jax.random.key(0)))
    assert abs((y == 0).mean() - 0.25) < 0.01 and abs(y.mean() - 1.0) < 0.01
    assert dropped_out(x, 0.25, None) is x and dropped_out(x, 0.0, jax.random.key(0)) is x


def test_inverted_dropout_on_odd_shapes_bfloat16_and_the_extreme_rates():
    from lowrax.core.dropout import inverted_dropout

    x = jnp.ones((3, 333, 101), jnp.bfloat16)  # an odd element count: the last 32-bit word is half used
    y = np.asarray(inverted_dropout(x, 0.1, jax.random.key(1)).astype(jnp.float32))
    assert y.shape == x.shape and abs((y == 0).mean() - 0.1) < 0.005
    assert set(np.unique(y)) <= {0.0, float(jnp.asarray(65536 / (65536 - 6554), jnp.bfloat16))}
    assert not np.any(np.asarray(inverted_dropout(x, 1.0, jax.random.key(1))))
    assert inverted_dropout(x, 1e-7, jax.random.key(1)) is x  # below 1/65536: no dropout
    first, second = (np.asarray(inverted_dropout(jnp.ones(1000), 0.5, jax.random.key(2))) for _ in range(2))
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("config", [BERT, GPT2], ids=["bert", "gpt2"])
def test_a_training_step_drops_out_and_remat_redraws_the_same_masks(config):
    import optax

    model, params = _random(config)
    wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=2, target_modules="all-linear", init="random"), jax.random.key(0),
                          model.model_type)
    trainable, frozen = lowrax.split(wrapped)
    ids = np.random.default_rng(2).integers(1, 64, (2, 6)).astype(np.int32)
    if model.classifies:
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.array([0, 1], np.int32)}
    else:
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    optimizer = optax.sgd(0.1)

    def loss_of(**options):
        step = jax.jit(make_train_step(model, optimizer, **options))
        _, metrics = step(init_state(trainable, optimizer, seed=0), frozen, batch)
        return float(metrics["loss"])

    dropped, recomputed, without = loss_of(), loss_of(remat=True), loss_of(model_dropout=False)
    assert abs(dropped - recomputed) <= 1e-6  # the backward pass's recompute draws the same masks
    assert abs(dropped - without) > 1e-4
