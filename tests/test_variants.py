"""The LoRA variants' exact rules: Delta-LoRA, LoRA-FA, LoRA+, VeRA, DoRA, PiSSA; over NF4 bases; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
from lowrax.errors import LowraxError
from lowrax.train.optim import OptimizerConfig, make_optimizer
from lowrax.train.step import init_state, make_train_step
from lowrax.adapters.lora import dora
from tests.test_train_step import make_batch, tiny  # noqa: F401 - fixture

Q = ("model", "layers", "0", "self_attn", "q_proj", "kernel")


def node_at(tree, path=Q):
    for key in path:
        tree = tree[key]
    return tree


def train(model, wrapped, steps, optim=None, batch_seed=0):
    """Run `steps` jitted steps; returns the combined params after each step (index 0: before)."""
    trainable, frozen = lowrax.split(wrapped)
    optimizer = make_optimizer(optim or OptimizerConfig(learning_rate=1e-2, total_steps=100, max_grad_norm=None))
    state = init_state(trainable, optimizer)
    step = jax.jit(make_train_step(model, optimizer))
    history = [wrapped]
    for i in range(steps):
        state, _ = step(state, frozen, make_batch(seed=batch_seed + i))
        history.append(lowrax.combine(state.trainable, frozen))
    return history, state


def f32(x):
    return np.asarray(x, np.float64)


def test_delta_lora_moves_the_base_by_exactly_the_change_of_the_product(tiny):  # noqa: F811
    model, params = tiny
    cfg = lowrax.LoraConfig(r=4, alpha=8, target_modules="all-linear", variant="delta_lora", delta_lambda=0.5,
                            delta_start_step=2)
    history, state = train(model, lowrax.lora.wrap(params, cfg, jax.random.key(1)), steps=5)
    nodes = [node_at(p) for p in history]
    s, lam = nodes[0].scale, 0.5
    w0 = f32(params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])
    for t in range(5):  # optimizer step t+1 took the adapter from nodes[t] to nodes[t + 1]
        moved = f32(nodes[t + 1].base_shift()) - f32(nodes[t].base_shift())
        product_change = f32(nodes[t + 1].a) @ f32(nodes[t + 1].b) - f32(nodes[t].a) @ f32(nodes[t].b)
        assert np.abs(product_change).max() > 1e-4  # the adapter did move
        expected = lam * s * product_change if t + 1 > 2 else 0 * product_change  # steps 1, 2 are before K = 2
        np.testing.assert_allclose(moved, expected, atol=2e-6)
        assert np.array_equal(np.asarray(nodes[t + 1].base), w0)  # W_0 itself is never rewritten
    # The forward uses the moved base: it equals the merged weights W_0 + shift + s A B.
    ids = make_batch()["input_ids"]
    assert np.abs(model.apply(history[-1], ids) - model.apply(lowrax.merge(history[-1]), ids)).max() <= 2e-5
    # No optimizer state and no update for W or the anchor: Adam moments exist for A and B only.
    moment_shapes = sorted({x.shape for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) == 2})
    assert moment_shapes == sorted({(64, 4), (4, 64), (4, 32), (128, 4), (4, 128)})
    assert lowrax.adapters.tree.count_trained(state.trainable) < lowrax.count_params(state.trainable)


def test_lora_fa_keeps_a_frozen_without_optimizer_state(tiny):  # noqa: F811
    model, params = tiny
    cfg = lowrax.LoraConfig(r=4, target_modules=("q_proj",), variant="lora_fa")
    wrapped = lowrax.lora.wrap(params, cfg, jax.random.key(1))
    trainable, _ = lowrax.split(wrapped)
    assert node_at(trainable).a is None and node_at(trainable).b is not None
    history, state = train(model, wrapped, steps=3)
    assert np.array_equal(node_at(history[-1]).a, node_at(wrapped).a)
    assert np.abs(node_at(history[-1]).b).max() > 0
    assert all(x.shape != (64, 4) for x in jax.tree.leaves(state.opt_state))  # no Adam moments shaped like A


def test_lora_fa_projected_gradient_is_the_full_gradient_projected_on_a(tiny):  # noqa: F811
    """PEFT's LoRA-FA rule: s * A @ grad_B' = A (A^T A)^-1 A^T dL/dW, the full-weight gradient's best step in A's span."""
    model, params = tiny
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=4, alpha=8, target_modules=("q_proj",), variant="lora_fa",
                                                          fa_projected_grad=True), jax.random.key(1))
    batch = make_batch()
    from lowrax.train.step import causal_lm_loss

    trainable, frozen = lowrax.split(wrapped)
    grads = jax.jit(jax.grad(lambda t: causal_lm_loss(model, lowrax.combine(t, frozen), batch)[0]))(trainable)
    projected = node_at(lowrax.adapters.tree.precondition_grads(grads, wrapped))
    full = jax.jit(jax.grad(lambda w: causal_lm_loss(model, _with_q(params, w), batch)[0]))(node_at(params))
    a, s = f32(node_at(wrapped).a), node_at(wrapped).scale
    expected = a @ np.linalg.solve(a.T @ a, a.T @ f32(full))
    np.testing.assert_allclose(s * a @ f32(projected.b), expected, atol=1e-5 * np.abs(expected).max())


def _with_q(params, w):
    out = jax.tree.map(lambda x: x, params)
    out["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] = w
    return out


def test_loraplus_scales_the_updates_of_b_and_vectors_only(tiny):  # noqa: F811
    model, params = tiny
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=4, target_modules="all-linear", variant="dora",
                                                          init="random"), jax.random.key(1))
    plain, _ = train(model, wrapped, 1, OptimizerConfig(learning_rate=1e-3, total_steps=10, max_grad_norm=None))
    plus, _ = train(model, wrapped, 1, OptimizerConfig(learning_rate=1e-3, total_steps=10, max_grad_norm=None,
                                                       loraplus_lr_ratio=16.0))
    before, after_plain, after_plus = (node_at(t) for t in (wrapped, plain[1], plus[1]))
    for field, ratio in (("a", 1.0), ("b", 16.0), ("magnitude", 16.0)):
        step_plain = f32(getattr(after_plain, field)) - f32(getattr(before, field))
        step_plus = f32(getattr(after_plus, field)) - f32(getattr(before, field))
        assert np.abs(step_plain).max() > 0
        np.testing.assert_allclose(step_plus, ratio * step_plain, rtol=1e-3, atol=1e-7)


def test_vera_shares_one_pair_of_projections(tiny):  # noqa: F811
    model, params = tiny
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=4, target_modules="all-linear", variant="vera"),
                               jax.random.key(1))
    shared = wrapped["vera_shared"]
    assert shared["a"].shape == (128, 4) and shared["b"].shape == (4, 128)  # sized for the largest in / out
    big = [x for x in jax.tree.leaves(wrapped) if x.shape in ((128, 4), (4, 128))]
    assert len(big) == 2  # one A and one B in the whole tree, not one per layer
    trainable, frozen = lowrax.split(wrapped)
    assert frozen["vera_shared"]["a"] is shared["a"] and trainable["vera_shared"]["a"] is None
    # trainable: lambda_d (r) and lambda_b (out) per adapted layer
    outs = [64, 32, 32, 64, 128, 128, 64] * 2
    assert lowrax.count_params(trainable) == sum(4 + o for o in outs)
    ids = make_batch()["input_ids"]
    assert np.array_equal(model.apply(wrapped, ids), model.apply(params, ids))  # lambda_b = 0 at init
    history, _ = train(model, wrapped, 2)
    assert np.array_equal(history[-1]["vera_shared"]["a"], shared["a"])  # the projections stay frozen
    assert np.abs(model.apply(history[-1], ids) - model.apply(lowrax.merge(history[-1]), ids)).max() <= 2e-5


def test_dora_magnitude_starts_at_the_column_norms_and_norm_is_detached(tiny):  # noqa: F811
    model, params = tiny
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=4, alpha=8, target_modules=("q_proj",), variant="dora",
                                                          init="random", layers_to_transform=(0,)), jax.random.key(1))
    node = node_at(wrapped)
    direct = np.linalg.norm(f32(node.base) + node.scale * f32(node.a) @ f32(node.b), axis=0)
    np.testing.assert_allclose(f32(node.magnitude), direct, rtol=1e-5)
    ids = make_batch()["input_ids"]
    lora_weight = _with_q(params, node.base + node.scale * node.a @ node.b)
    assert np.abs(model.apply(wrapped, ids) - model.apply(lora_weight, ids)).max() <= 1e-5  # W' = W + s A B at init
    # The norm is a constant for the gradient (paper, section 4.3): d y / d magnitude = y_dir / norm only.
    x = jax.random.normal(jax.random.key(3), (5, 64))
    grad_a = jax.grad(lambda a: lowrax.linear(x, {"kernel": node.replace(a=a)}).sum())(node.a)
    norm = jax.lax.stop_gradient(dora.column_norms(node.base, node.a, node.b, node.scale))
    manual = jax.grad(lambda a: ((x @ node.base + node.scale * x @ a @ node.b) * (node.magnitude / norm)).sum())(node.a)
    np.testing.assert_allclose(grad_a, manual, rtol=1e-4, atol=1e-6)


def test_pissa_puts_the_top_singular_part_in_the_adapter(tiny):  # noqa: F811
    model, params = tiny
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="pissa"),
                               jax.random.key(1))
    node, w = node_at(wrapped), f32(node_at(params))
    singular = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(np.linalg.svd(node.scale * f32(node.a) @ f32(node.b), compute_uv=False)[:4], singular[:4], rtol=1e-4)
    np.testing.assert_allclose(np.linalg.svd(f32(node.base), compute_uv=False)[:-4], singular[4:], rtol=1e-4, atol=1e-5)
    ids = make_batch()["input_ids"]
    assert np.abs(model.apply(wrapped, ids) - model.apply(params, ids)).max() <= 1e-4


@pytest.mark.parametrize("variant,extra", [("lora", {}), ("lora_fa", {}), ("dora", {}), ("vera", {}),
                                           ("delta_lora", {}), ("lora", {"init": "pissa"})])
def test_every_variant_trains_over_an_nf4_base(tiny, variant, extra):  # noqa: F811
    model, params = tiny
    quantized = lowrax.quantize(params, lowrax.QuantConfig(blocksize=64))
    wrapped = lowrax.lora.wrap(quantized, lowrax.LoraConfig(r=4, target_modules="all-linear", variant=variant, **extra),
                               jax.random.key(1))
    base = node_at(wrapped).base
    assert isinstance(base, lowrax.NF4Tensor)
    ids = make_batch()["input_ids"]
    if "init" not in extra:  # an adapter at init leaves the quantized model's output as it was
        assert np.abs(model.apply(wrapped, ids) - model.apply(quantized, ids)).max() <= 1e-5
    trainable, frozen = lowrax.split(wrapped)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, total_steps=100))
    state = init_state(trainable, optimizer)
    step = jax.jit(make_train_step(model, optimizer))
    losses = []
    for _ in range(4):
        state, m = step(state, frozen, make_batch())
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    after = node_at(lowrax.combine(state.trainable, frozen)).base  # the NF4 base is never rewritten
    assert np.array_equal(after.packed, base.packed) and np.array_equal(after.absmax, base.absmax)


@pytest.mark.parametrize("option,value,owner", [("d_initial", 0.2, "vera"), ("delta_lambda", 0.5, "delta_lora"),
                                                ("delta_start_step", 3, "delta_lora"), ("fa_projected_grad", True, "lora_fa")])
def test_variant_option_on_another_variant_names_its_variant(option, value, owner):
    with pytest.raises(LowraxError, match=rf"LoraConfig\.{option} applies to variant '{owner}' only; this config has variant='lora'"):
        lowrax.LoraConfig(**{option: value})


def test_bad_variant_combinations():
    with pytest.raises(LowraxError, match=r"variant must be one of .*did you mean 'dora'"):
        lowrax.LoraConfig(variant="dorra")
    with pytest.raises(LowraxError, match="rank_pattern does not apply to variant 'vera'"):
        lowrax.LoraConfig(variant="vera", rank_pattern={"q_proj": 2})
    with pytest.raises(LowraxError, match="init='pissa' applies to variants 'lora' and 'lora_fa', not 'dora'"):
        lowrax.LoraConfig(variant="dora", init="pissa")
    with pytest.raises(LowraxError, match="no dropout on the low-rank path"):
        lowrax.LoraConfig(variant="delta_lora", dropout=0.1)


def test_vera_adapter_whose_projections_do_not_fit(tiny, tmp_path):  # noqa: F811
    model, params = tiny
    small = lowrax.lora.wrap(params, lowrax.LoraConfig(r=4, target_modules=("q_proj",), variant="vera"), jax.random.key(1))
    lowrax.save_peft(small, tmp_path / "vera", model)  # projections sized for q_proj: 64 x 64
    with pytest.raises(lowrax.CheckpointError, match=r"VeRA projections do not fit model\.layers\.0\.mlp\.down_proj: "
                                                     r"vera_A covers in=64.*needs in=128"):
        import json
        from lowrax.peft.format import load_peft

        config = json.loads((tmp_path / "vera" / "adapter_config.json").read_text())
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(tmp_path / "vera" / "adapter_model.safetensors"))
        # re-target the q_proj vectors at down_proj (in=128), which the 64-wide vera_A cannot cover
        tensors = {k.replace("self_attn.q_proj", "mlp.down_proj"): v for k, v in tensors.items()}
        save_file(tensors, str(tmp_path / "vera" / "adapter_model.safetensors"))
        config["target_modules"] = ["down_proj"]
        (tmp_path / "vera" / "adapter_config.json").write_text(json.dumps(config))
        load_peft(params, tmp_path / "vera", model)
