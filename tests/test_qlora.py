"""QLoRA: LoRA over NF4 base weights, trained with the same step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
from lowrax.errors import LowraxError
from lowrax.train.optim import OptimizerConfig, make_optimizer
from lowrax.quant.nf4 import NF4Tensor, dequantize
from lowrax.train.step import init_state, make_train_step
from tests.test_bad_input import tiny_llama_dir  # noqa: F401 - fixture
from tests.test_train_step import make_batch, tiny  # noqa: F401 - fixture
from tests.conftest import forward  # noqa: E402


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
    train_step, traces = make_train_step(model, optimizer), []

    def counted_step(*args):  # counts traces: the NF4 nodes must not make the step retrace
        traces.append(1)
        return train_step(*args)

    step = jax.jit(counted_step, donate_argnums=(0,))
    batch = make_batch()
    losses = []
    for _ in range(15):
        state, m = step(state, frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5 and len(traces) == 1
    trained = lowrax.combine(state.trainable, frozen)
    merged = lowrax.merge(trained)  # NF4 base dequantized, adapters added
    ids = batch["input_ids"]
    assert np.abs(np.asarray(forward(model)(trained, ids)) - np.asarray(forward(model)(merged, ids))).max() <= 1e-4
    base = trained["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].base
    assert isinstance(base, NF4Tensor)
    err = np.abs(np.asarray(dequantize(base)) - np.asarray(params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]))
    assert 0 < err.mean() < 0.05  # a 4-bit base, close to the original


def test_quantize_on_load_equals_quantizing_after(tiny_llama_dir):  # noqa: F811
    model, params = lowrax.load_pretrained(tiny_llama_dir, progress=False)
    after = lowrax.quantize(params, lowrax.QuantConfig(blocksize=32), model)
    _, on_load = lowrax.load_pretrained(tiny_llama_dir, quantize=lowrax.QuantConfig(blocksize=32), progress=False)
    assert jax.tree.structure(after) == jax.tree.structure(on_load)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(on_load)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    k = on_load["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    assert isinstance(k, NF4Tensor) and k.shape == (16, 8) and k.transposed


def test_merge_requantized_reports_the_added_error(tiny):  # noqa: F811
    model, params = tiny
    q = lowrax.quantize(params, lowrax.QuantConfig(), model)
    wrapped = lowrax.lora.wrap(q, lowrax.LoraConfig(r=4, target_modules=("q_proj", "v_proj"), init="random"), jax.random.key(0))
    merged, report = lowrax.merge_requantized(wrapped)
    kernel = merged["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kernel, NF4Tensor) and kernel.transposed
    assert set(report) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"} | {"worst"}
    exact = lowrax.merge(wrapped)["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    error = np.abs(np.asarray(dequantize(kernel)) - np.asarray(exact))
    entry = report["model.layers.0.self_attn.q_proj"]
    assert abs(entry["max_abs"] - error.max()) <= 1e-6 and 0 < entry["relative"] < 0.2


def test_generation_with_nf4_weights_uses_the_float_dtype(tiny):  # noqa: F811
    """With the output head quantized too, the tree's first leaf holds uint8 codes: the KV cache must still be float."""
    model, params = tiny
    q = lowrax.quantize(params, lowrax.QuantConfig(blocksize=32, skip_modules=()), model)
    assert jax.tree.leaves(q)[0].dtype == jnp.uint8  # lm_head's packed codes
    plain = lowrax.generate_ids(model, lowrax.merge(q), [[1, 2, 3]], max_new_tokens=4)
    assert lowrax.generate_ids(model, q, [[1, 2, 3]], max_new_tokens=4) == plain


def test_nf4_matmul_gradient_equals_the_dense_one_and_keeps_one_weight_alive():
    """The custom VJP (dequantize again in the backward pass) gives the dense gradient, and XLA
    holds one dequantized weight at a time rather than all of them."""
    import jax
    import jax.numpy as jnp

    from lowrax.core.linear import matmul
    from lowrax.quant import nf4

    weights = [nf4.quantize(jax.random.normal(jax.random.key(i), (256, 256)) * 0.05, 64, double) for i, double in
               enumerate([True, False] * 4)]
    x = jax.random.normal(jax.random.key(9), (8, 256))

    def chain(x, ws, dense):
        for w in ws:
            x = jnp.tanh(x @ nf4.dequantize(w) if dense else matmul(x, w))
        return jnp.sum(x * x)

    np.testing.assert_allclose(jax.grad(chain)(x, weights, False), jax.grad(chain)(x, weights, True), rtol=1e-5, atol=1e-6)
    one_weight = 256 * 256 * 4
    for fn in (lambda x: chain(x, weights, False), jax.grad(lambda x: chain(x, weights, False))):
        temp = jax.jit(fn).lower(x).compile().memory_analysis().temp_size_in_bytes
        assert temp < 3 * one_weight, temp  # all eight dequantized weights would be 8x
