"""QLoRA: LoRA over NF4 base weights, trained with the same step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
from lowrax.errors import LowraxError
from lowrax.optim import OptimizerConfig, make_optimizer
from lowrax.quant.nf4 import NF4Tensor, dequantize
from lowrax.train_step import init_state, make_train_step
from tests.test_train_step import make_batch, tiny  # noqa: F401 - fixture


def test_quantize_keeps_embeddings_and_norms(tiny):  # noqa: F811
    _, params = tiny
    q = lowrax.quantize(params, lowrax.QuantConfig())
    layer = q["model"]["layers"]["0"]
    assert isinstance(layer["self_attn"]["q_proj"]["kernel"], NF4Tensor)
    assert isinstance(q["lm_head"]["kernel"], jax.Array) and isinstance(q["model"]["embed_tokens"]["embedding"], jax.Array)
    assert isinstance(layer["input_layernorm"]["scale"], jax.Array)
    with pytest.raises(LowraxError, match="blocksize must be a power of two"):
        lowrax.QuantConfig(blocksize=100)


def test_qlora_trains_and_merges(tiny):  # noqa: F811
    model, params = tiny
    q = lowrax.quantize(params, lowrax.QuantConfig(blocksize=32))
    wrapped = lowrax.lora.wrap(q, lowrax.LoraConfig(r=4, target_modules="all-linear"), jax.random.key(0))
    trainable, frozen = lowrax.split(wrapped)
    # only adapter arrays are trained: every trainable leaf is an A [in, 4] or B [4, out]
    assert all(x.dtype == jnp.float32 and 4 in x.shape for x in jax.tree.leaves(trainable))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, total_steps=50))
    state = init_state(trainable, optimizer)
    step = jax.jit(make_train_step(model, optimizer), donate_argnums=(0,))
    batch = make_batch()
    losses = []
    for _ in range(15):
        state, m = step(state, frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5 and step._cache_size() == 1
    trained = lowrax.combine(state.trainable, frozen)
    merged = lowrax.merge(trained)  # NF4 base dequantized, adapters added
    ids = batch["input_ids"]
    assert np.abs(np.asarray(model.apply(trained, ids)) - np.asarray(model.apply(merged, ids))).max() <= 1e-4
    base = trained["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].base
    assert isinstance(base, NF4Tensor)
    err = np.abs(np.asarray(dequantize(base)) - np.asarray(params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]))
    assert 0 < err.mean() < 0.05  # a 4-bit base, close to the original
