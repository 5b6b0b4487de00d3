"""The pure train step: gradients only for adapters, one compilation, accumulation, FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrax
from lowrax.errors import LowraxError
from lowrax.models import model_from_hf_config
from lowrax.train.optim import OptimizerConfig, make_optimizer
from lowrax.train.step import init_state, make_train_step
from lowrax.core.node import FullyTrained

CONFIG = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def tiny():
    model = model_from_hf_config(CONFIG)
    key = jax.random.key(0)
    shapes = model.param_shapes()
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    params = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])
    return model, params


def make_batch(b=2, t=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 128, (b, t)).astype(np.int32)
    loss_mask = np.ones((b, t), np.int32)
    loss_mask[:, : t // 2] = 0  # a prompt half that is not trained on
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.asarray(loss_mask)}


def setup(model, params, cfg=None, optimizer=None, **step_kwargs):
    wrapped = lowrax.lora.wrap(params, cfg or lowrax.LoraConfig(r=4, target_modules="all-linear"), jax.random.key(1))
    trainable, frozen = lowrax.split(wrapped)
    optimizer = optimizer or make_optimizer(OptimizerConfig(learning_rate=1e-2, total_steps=100))
    state = init_state(trainable, optimizer)
    step = jax.jit(make_train_step(model, optimizer, **step_kwargs), donate_argnums=(0,))
    return state, frozen, step


def test_loss_falls_base_stays_frozen_and_compiles_once(tiny):
    model, params = tiny
    state, frozen, step = setup(model, params)
    batch = make_batch()
    losses = []
    for _ in range(20):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5
    assert step._cache_size() == 1
    merged_base = lowrax.combine(state.trainable, frozen)["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].base
    assert np.array_equal(merged_base, params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])


def test_frozen_leaves_have_no_optimizer_state(tiny):
    model, params = tiny
    state, _, _ = setup(model, params)
    n_trainable = lowrax.count_params(state.trainable)
    state_sizes = [x.size for x in jax.tree.leaves(state.opt_state)]
    # AdamW: mu and nu per trainable scalar, plus step counters; nothing sized like a frozen weight.
    assert sum(s for s in state_sizes if s > 1) == 2 * n_trainable
    assert n_trainable < lowrax.count_params(params) / 5


def test_gradient_accumulation_equals_one_big_batch(tiny):
    model, params = tiny
    big = make_batch(b=4)
    micro = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), big)
    # Plain SGD so the parameters differ exactly by the gradients (Adam's first step normalises them away).
    sgd = optax.sgd(1.0)
    s1, frozen, step1 = setup(model, params, optimizer=sgd)
    s2, _, step2 = setup(model, params, optimizer=sgd, grad_accum_steps=2)
    s1, m1 = step1(s1, frozen, big)
    s2, m2 = step2(s2, frozen, micro)
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-5
    for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_remat_gives_the_same_step(tiny, dropout):
    """The recomputation draws the same dropout masks as the forward pass."""
    model, params = tiny
    cfg = lowrax.LoraConfig(r=4, target_modules="all-linear", dropout=dropout)
    s1, frozen, step1 = setup(model, params, cfg)
    s2, _, step2 = setup(model, params, cfg, remat=True)
    batch = make_batch()
    s1, _ = step1(s1, frozen, batch)
    s2, _ = step2(s2, frozen, batch)
    for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6


@pytest.mark.parametrize("variant", ["qlora", "dora", "vera"])
def test_remat_gives_the_same_step_for_variants(tiny, variant):
    """Remat's recomputation goes through the variants' own VJPs (NF4 dequantization, DoRA norms)."""
    model, params = tiny
    cfg = lowrax.LoraConfig(r=4, target_modules="all-linear", variant="lora" if variant == "qlora" else variant)
    if variant == "qlora":
        params = lowrax.quantize(params, lowrax.QuantConfig(blocksize=32), model)
    s1, frozen, step1 = setup(model, params, cfg)
    s2, _, step2 = setup(model, params, cfg, remat=True)
    for _ in range(2):
        s1, m1 = step1(s1, frozen, make_batch())
        s2, m2 = step2(s2, frozen, make_batch())
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-5
    for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5


def _step_temp_bytes(model, params, remat) -> int:
    state, frozen, step = setup(model, params, remat=remat)
    return step.lower(state, frozen, make_batch(b=4, t=64)).compile().memory_analysis().temp_size_in_bytes


def test_remat_keeps_less_for_the_backward_pass():
    config = {**CONFIG, "num_hidden_layers": 6, "hidden_size": 128, "intermediate_size": 512}
    model = model_from_hf_config(config)
    params = jax.tree.map(lambda s: 0.02 * jnp.ones(s.shape, s.dtype), model.param_shapes())
    plain, remat = _step_temp_bytes(model, params, False), _step_temp_bytes(model, params, True)
    # Each layer keeps one [b, t, hidden] input instead of all its activations. (Without remat the
    # lean backwards already keep one array per softmax, activation and GLU: about half as much.)
    assert remat < 0.6 * plain, (plain, remat)


GPT2 = {"model_type": "gpt2", "vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}
BERT = {"model_type": "bert", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 64}


@pytest.mark.parametrize("hf_config", [GPT2, BERT], ids=["gpt2", "bert"])
def test_remat_gradients_equal_for_every_family(hf_config):
    model = model_from_hf_config(hf_config)
    shapes = model.param_shapes()
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=4, target_modules="all-linear", init="gaussian"),
                               jax.random.key(1), model.model_type)
    trainable, frozen = lowrax.split(wrapped)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)

    def loss(m):
        def f(t):
            out = m.apply(lowrax.combine(t, frozen), ids)
            out = out if isinstance(out, jnp.ndarray) else out.last_hidden_state
            return jnp.sum(jnp.sin(out))
        return jax.jit(jax.grad(f))(trainable)

    for a, b in zip(jax.tree.leaves(loss(model)), jax.tree.leaves(loss(model.with_remat(True)))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_remat_must_be_a_bool():
    with pytest.raises(LowraxError, match="remat must be true or false, got 'layers'"):
        model_from_hf_config(CONFIG).with_remat("layers")


def test_bf16_base_with_float32_adapters(tiny):
    model, params = tiny
    base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    state, frozen, step = setup(model, base16)
    state, metrics = step(state, frozen, make_batch())
    assert np.isfinite(float(metrics["loss"]))
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.size > 1} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}


def compiled_flops(model, trainable, frozen, batch):
    optimizer = make_optimizer(OptimizerConfig(total_steps=10))
    step = jax.jit(make_train_step(model, optimizer))
    state = init_state(trainable, optimizer)
    cost = step.lower(state, frozen, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


def test_lora_step_flops_at_most_three_quarters_of_full_finetuning():
    # Wide enough that the weight matmuls dominate, as in real models (at hidden 64 the
    # attention scores and norms are a large share of the work in both steps).
    model = model_from_hf_config({**CONFIG, "hidden_size": 256, "intermediate_size": 512})
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01), model.param_shapes())
    batch = make_batch(b=2, t=32)
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=4, target_modules="all-linear"), jax.random.key(1))
    lora_flops = compiled_flops(model, *lowrax.split(wrapped), batch)
    full_flops = compiled_flops(model, *lowrax.split(jax.tree.map(FullyTrained, params)), batch)
    assert lora_flops <= 0.75 * full_flops, (lora_flops, full_flops)


def test_loss_at_gathered_positions_equals_full_logits(tiny):
    """Scoring only the loss positions (packed rows included) gives the same loss and gradients."""
    from lowrax.train.data import Batches, Encoded
    from lowrax.train.step import causal_lm_loss

    model, params = tiny
    rng = np.random.default_rng(1)
    ids = [rng.integers(1, 128, n).tolist() for n in (5, 7, 4, 6, 3, 8)]
    masks = [[0] * (len(x) // 2) + [1] * (len(x) - len(x) // 2) for x in ids]
    data = Encoded(ids, masks, "causal_lm")
    full = Batches(data, 16, 2, seed=0, packing=True).batch(0)
    gathered = Batches(data, 16, 2, seed=0, packing=True, loss_positions=12).batch(0)
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=2, target_modules="all-linear", init="random"), jax.random.key(0))
    trainable, frozen = lowrax.split(wrapped)

    def loss(t, batch):
        s, n = causal_lm_loss(model, lowrax.combine(t, frozen), {k: jnp.asarray(v) for k, v in batch.items()})
        return s / n

    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(loss))(trainable, b) for b in (full, gathered))
    assert abs(float(l1) - float(l2)) <= 1e-6
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6
    with pytest.raises(LowraxError, match="raise data.loss_positions"):
        Batches(data, 16, 2, seed=0, packing=True, loss_positions=2).batch(0)


def test_schedules_warm_up_and_decay():
    from lowrax.train.optim import learning_rate_schedule

    for kind, end in (("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)):
        lr = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, schedule=kind, warmup_steps=10, total_steps=110))
        assert float(lr(0)) == 0.0 and abs(float(lr(5)) - 0.5) < 1e-6 and abs(float(lr(10)) - 1.0) < 1e-6
        assert abs(float(lr(110)) - end) < 1e-6
    with pytest.raises(ValueError, match="schedule must be one of"):
        OptimizerConfig(schedule="step")
