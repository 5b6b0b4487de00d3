"""The logits are computed a block of positions at a time: by the fused cross-entropy
(`objectives.fused_logps`) for token log-probs, by the same mechanism (`head_position_losses`) for distillation
(student and teacher together). Losses and gradients equal the whole-logits computation, and the
step's compiled temporaries shrink."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
from lowrax.models import model_from_hf_config
from lowrax.objectives import logps as logps_module
from lowrax.objectives.config import DistillSection
from lowrax.objectives.step_losses import distill_objective
from lowrax.train.step import causal_lm_loss

VOCAB = 512
CONFIG = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 128, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny llama with a LoRA on every linear layer, the head included (so the head has a gradient)."""
    import json

    from safetensors.numpy import save_file

    path = tmp_path_factory.mktemp("blocked-llama")
    model = model_from_hf_config(CONFIG)
    rng = np.random.default_rng(0)
    save_file({t.hf_key: (0.2 * rng.normal(size=t.hf_shape)).astype(np.float32) for t in model.tensors()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(CONFIG))
    model, base = lowrax.load_pretrained(path)
    cfg = lowrax.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    params = lowrax.lora.wrap(base, cfg, jax.random.key(1), model.model_type)
    # B starts at zero: move every factor off its initial value so that each one has a gradient
    trainable, frozen = lowrax.split(params)
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    moved = [x + 0.05 * jax.random.normal(key, x.shape, x.dtype) for x, key in zip(leaves, keys)]
    return model, lowrax.combine(jax.tree.unflatten(tree, moved), frozen)


def batch(n=3, t=37, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (n, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 30:] = 0
    loss_mask = mask.copy()
    loss_mask[:, :5] = 0
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def attention_blocks(monkeypatch, block_bytes):
    """Attention by blocks of queries of `block_bytes` whatever its size (1 << 40: whole)."""
    from lowrax.core import layers

    monkeypatch.setattr(layers, "ATTENTION_WHOLE_LIMIT", 0 if block_bytes < 1 << 40 else 1 << 62)
    monkeypatch.setattr(layers, "ATTENTION_BLOCK_BYTES", block_bytes)


def loss_and_grads(model, params, loss_fn, data):
    trainable, frozen = lowrax.split(params)

    def mean_loss(trainable):
        total, count, *_ = loss_fn(model, lowrax.combine(trainable, frozen), data)
        return total / count

    return jax.jit(jax.value_and_grad(mean_loss))(trainable)


def test_large_attention_scores_go_by_blocks():
    """The default blocks only what is large: SmolLM2's attention scores at 4 x 256 tokens (9 MB a layer)
    stay whole; at 8 x 1024 tokens they go by blocks."""
    from lowrax.core import layers

    heads = 9
    assert 4 * 4 * heads * 256 * 256 <= layers.ATTENTION_WHOLE_LIMIT < 4 * 8 * heads * 1024 * 1024


def whole_logits_causal_lm_loss(model, params, batch):
    """causal_lm_loss computed the plain way: every position's logits, then log-softmax."""
    hidden = model.final_hidden(params, batch["input_ids"], batch["attention_mask"])
    n, t = batch["input_ids"].shape
    logits = logps_module.logits_at(model, params, hidden, jnp.broadcast_to(jnp.arange(t - 1), (n, t - 1)))
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(-logps_module.target_logps(logits, batch["input_ids"][:, 1:]) * weights), jnp.sum(weights)


def without_head_adapter(params):
    """The student with its lm_head a plain frozen kernel (the usual LoRA: the layers only)."""
    head = params["lm_head"]
    return {**params, "lm_head": {**head, "kernel": head["kernel"].base}}


@pytest.mark.parametrize("block_positions", [1, 7, 20, 36])
@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_fused_causal_lm_loss_and_gradients_equal_the_whole_logits(student, block_positions, head, monkeypatch):
    """The fused cross-entropy (blocks of 1, 7 and 20 positions, the last one padded, and one block of
    all 36) against the plain computation: with a LoRA on lm_head, which gets its gradient through it
    (logits recomputed in the backward), and with a frozen head (the hidden states' gradient formed in
    the forward)."""
    from lowrax.objectives import fused_logps

    model, params = student
    if head == "frozen":
        params = without_head_adapter(params)
        assert isinstance(params["lm_head"]["kernel"], jax.Array)
    data = batch()
    whole = loss_and_grads(model, params, whole_logits_causal_lm_loss, data)
    monkeypatch.setattr(fused_logps, "BLOCK_BYTES", 4 * 3 * VOCAB * block_positions)
    blocked = loss_and_grads(model, params, causal_lm_loss, data)
    np.testing.assert_allclose(float(blocked[0]), float(whole[0]), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(blocked[1]), jax.tree.leaves(whole[1])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(whole[1]))


def whole_logits_distill_loss(cfg, teacher_logits):
    """The distillation loss computed the plain way: every completion position's student logits at once."""
    from lowrax.objectives.distill import token_divergence

    def loss_fn(model, params, batch):
        hidden = model.final_hidden(params, batch["input_ids"], batch["attention_mask"])
        student = logps_module.logits_at(model, params, hidden, batch["loss_positions"])
        teacher = teacher_logits(batch)
        divergence = token_divergence(student, teacher, beta=cfg.beta, temperature=cfg.temperature)
        hard = -logps_module.target_logps(student, batch["loss_targets"])
        mixed = (1.0 - cfg.hard_label_weight) * divergence + cfg.hard_label_weight * hard
        weights = batch["loss_weights"]
        return jnp.sum(mixed * weights), jnp.sum(weights)

    return loss_fn


@pytest.mark.parametrize("block_positions", [1, 5, 12])
@pytest.mark.parametrize("head", ["trained", "frozen"])
@pytest.mark.parametrize("stored_teacher", [False, True])
def test_distillation_blocks_student_and_teacher_together(student, stored_teacher, head, block_positions, monkeypatch):
    """Distillation's fused loss (blocks of 1 and 5 positions, the last padded, and one of all 12) against
    the plain computation, with the teacher in the step or its logits stored, and with a LoRA on lm_head
    (logits recomputed in the backward) or a frozen head (the hidden states' gradient formed in the
    forward)."""
    from lowrax.objectives import fused_logps

    model, params = student
    teacher = jax.tree.map(lambda x: x * 1.1 if x.dtype == jnp.float32 else x, lowrax.merge(params))
    if head == "frozen":
        params = without_head_adapter(params)
    data = batch()
    k = 12
    data = {**data, "loss_positions": np.tile(np.arange(5, 5 + k), (3, 1)).astype(np.int32),
            "loss_targets": data["input_ids"][:, 6:6 + k], "loss_weights": np.ones((3, k), np.float32)}
    data["loss_weights"][1, -3:] = 0.0
    cfg = DistillSection(beta=0.5, temperature=2.0, hard_label_weight=0.3)

    def teacher_logits(batch):
        hidden = model.final_hidden(teacher, batch["input_ids"], batch["attention_mask"])
        return logps_module.logits_at(model, teacher, hidden, batch["loss_positions"])

    if stored_teacher:
        data["teacher_logits"] = np.asarray(teacher_logits(data))
        loss_fn = distill_objective(cfg)
    else:
        objective = distill_objective(cfg, model)

        def loss_fn(model, params, batch):
            return objective(model, params, batch, teacher)
    whole = loss_and_grads(model, params, whole_logits_distill_loss(cfg, teacher_logits), data)
    monkeypatch.setattr(fused_logps, "BLOCK_BYTES", 4 * 3 * VOCAB * block_positions)
    fused = loss_and_grads(model, params, loss_fn, data)
    np.testing.assert_allclose(float(fused[0]), float(whole[0]), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(whole[1])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(whole[1]))


def test_distillation_metrics_are_the_divergence_and_the_cross_entropy(student):
    model, params = student
    teacher = jax.tree.map(lambda x: x * 1.1 if x.dtype == jnp.float32 else x, lowrax.merge(params))
    data = batch()
    k = 6
    data = {**data, "loss_positions": np.tile(np.arange(5, 5 + k), (3, 1)).astype(np.int32),
            "loss_targets": data["input_ids"][:, 6:6 + k], "loss_weights": np.ones((3, k), np.float32)}
    pure_divergence = DistillSection(beta=0.5, temperature=1.0, hard_label_weight=0.0)
    pure_hard = DistillSection(beta=0.5, temperature=1.0, hard_label_weight=1.0)
    total_div, _, metrics = distill_objective(pure_divergence, model)(model, params, data, teacher)
    total_hard, _, _ = distill_objective(pure_hard, model)(model, params, data, teacher)
    np.testing.assert_allclose(float(metrics["divergence"]), float(total_div), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["hard_loss"]), float(total_hard), rtol=1e-6)


def test_the_compiled_step_keeps_one_block_of_logits(student, monkeypatch):
    """With a vocabulary-dominated shape, the gradient's compiled temporaries with the fused
    cross-entropy are smaller than the plain computation's by more than the logits' size: the plain
    one keeps the whole logits for its backward, the fused one an eighth of them."""
    from lowrax.objectives import fused_logps

    model, params = student
    data = batch(n=32, t=32)  # short rows: the logits, not the attention, dominate the temporaries
    logits = 4 * 32 * 31 * VOCAB
    monkeypatch.setattr(fused_logps, "BLOCK_BYTES", logits // 8)

    def temp_bytes(loss_fn):
        trainable, frozen = lowrax.split(params)

        def mean_loss(trainable):
            total, count = loss_fn(model, lowrax.combine(trainable, frozen), data)
            return total / count

        compiled = jax.jit(jax.grad(mean_loss)).lower(trainable).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, fused = temp_bytes(whole_logits_causal_lm_loss), temp_bytes(causal_lm_loss)
    assert fused < whole - logits, (whole, fused, logits)


def plain_attention(q, k, v, mask, scale, softcap, bias):
    """Grouped-query attention by plain differentiation of its formula (the reference)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    scores = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kv, h // kv, d), k) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.reshape(bias.shape[0], kv, h // kv, *bias.shape[2:])
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, h * d)


@pytest.mark.parametrize("block_queries", [4, 13])
@pytest.mark.parametrize("softcap, with_bias", [(None, False), (30.0, False), (None, True)])
def test_attention_equals_the_plain_computation(softcap, with_bias, block_queries, monkeypatch):
    """Values and gradients of `layers.attention` (GQA, padding, a causal mask, Gemma's softcap, T5's
    bias), whole and a block of 4 queries at a time (the last block padded, rematerialised), equal plain
    differentiation of the formula."""
    from lowrax.core import layers

    b, t, h, kv, d = 2, 13, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (b, t, n, d)) for key, n in zip(keys, (h, kv, kv)))
    lengths = jnp.array([13, 9])
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    bias = jax.random.normal(keys[3], (1, h, t, t)) if with_bias else None
    weights = jax.random.normal(keys[4], (b, t, h * d)) * valid[..., None]

    def run(attend):
        def total(q, k, v):
            out = attend(q, k, v, mask, 0.3, softcap, bias)
            return jnp.sum(out * weights), out
        (_, out), grads = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    attention_blocks(monkeypatch, 4 * b * h * t * block_queries if block_queries < t else 1 << 40)
    got = run(lambda q, k, v, mask, scale, softcap, bias: layers.attention(q, k, v, mask, scale, softcap, bias))
    want = run(plain_attention)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
    for got_grad, want_grad in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), rtol=1e-5, atol=1e-5)


def test_a_model_with_blocked_attention_trains_as_with_whole(student, monkeypatch):
    model, params = student
    data = batch()
    attention_blocks(monkeypatch, 1 << 40)
    whole = loss_and_grads(model, params, causal_lm_loss, data)
    attention_blocks(monkeypatch, 4 * 3 * 4 * 37 * 5)
    blocked = loss_and_grads(model, params, causal_lm_loss, data)
    np.testing.assert_allclose(float(blocked[0]), float(whole[0]), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(blocked[1]), jax.tree.leaves(whole[1])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
