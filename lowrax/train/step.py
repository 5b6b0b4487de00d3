"""One pure training step: `train_step(state, frozen, batch) -> (state, metrics)`.

Gradients are taken with respect to the trainable half only, so no gradient
(and no optimizer state) ever exists for a frozen weight. Gradient
accumulation and rematerialisation are options of this one step. Mixed
precision comes from the tree itself: load the base in bfloat16 and wrap with
float32 adapters; the projections compute in the activations' dtype while
gradients and optimizer state stay in the adapters' float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lowrax.core.dropout import with_model_dropout
from lowrax.objectives.fused_logps import target_logps
from lowrax.objectives.logps import classifier_logits, logps_at
from lowrax.adapters.tree import after_update, combine, penalty, precondition_grads, with_dropout_keys

MODEL_DROPOUT_STREAM = 0x6D6F64  # folded into the step's key for the model's own dropout (adapters use 0, 1, ...)


@struct.dataclass
class TrainState:
    """Everything that changes during training (the frozen half is passed separately)."""

    step: jnp.ndarray
    trainable: Any
    opt_state: Any
    rng: jnp.ndarray


def init_state(trainable: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                      opt_state=optimizer.init(trainable), rng=jax.random.key_data(jax.random.key(seed)))


def causal_lm_loss(model, params, batch) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of token losses, number of loss tokens) for a causal-LM batch.

    batch: input_ids, attention_mask, loss_mask [b, t]; loss_mask[b, i] = 1 when token i is
    a target (a response token, not prompt or padding), predicted from position i - 1.
    Optional segment_ids [b, t] for packed rows. With loss_positions / loss_targets /
    loss_weights [b, K] (see `Batches(loss_positions=K)`), logits are computed only at
    those K positions per row instead of all t: the vocabulary projection is the
    largest single matmul of a small model.
    """
    segments = batch.get("segment_ids")
    hidden = model.final_hidden(params, batch["input_ids"], batch["attention_mask"], segment_ids=segments)
    if "loss_positions" in batch:
        positions, targets = batch["loss_positions"], batch["loss_targets"]
        weights = batch["loss_weights"].astype(jnp.float32)
    else:
        n, t = batch["input_ids"].shape
        positions = jnp.broadcast_to(jnp.arange(t - 1), (n, t - 1))
        targets = batch["input_ids"][:, 1:]
        weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
        if segments is not None:  # never predict a packed example's first token from the previous example
            weights = weights * (segments[:, 1:] == segments[:, :-1])
    token_loss = -logps_at(model, params, hidden, positions, targets)  # the logits a block at a time
    return jnp.sum(token_loss * weights), jnp.sum(weights)


def classification_loss(model, params, batch):
    """(sum of example losses, number of examples, {"accuracy": how many examples' highest logit is their
    label}); the step divides the count like the loss, so its metrics show the batch's accuracy. batch:
    input_ids, attention_mask (pixel_values for an image model), labels [b], optionally example_weights [b]
    (0 drops an example, e.g. filler rows of a last batch)."""
    logits = classifier_logits(model, params, batch)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    loss = -jnp.take_along_axis(log_probs, batch["labels"][:, None], axis=-1)[:, 0]
    weights = batch.get("example_weights", jnp.ones_like(loss)).astype(jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * weights)
    return jnp.sum(loss * weights), jnp.sum(weights), {"accuracy": correct}


def seq2seq_loss(model, params, batch) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of target-token losses, number of target tokens) for an encoder-decoder batch: input_ids,
    attention_mask [b, s]; labels, loss_mask [b, t] (the decoder reads the labels shifted right)."""
    labels = batch["labels"]
    logits = model.apply(params, batch["input_ids"], batch["attention_mask"],
                         decoder_input_ids=model.shift_right(labels)).astype(jnp.float32)
    weights = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(-target_logps(logits, labels) * weights), jnp.sum(weights)


def task_loss(model):
    """The supervised loss of the model's kind: next-token, seq2seq or classification."""
    if model.is_causal_lm:
        return causal_lm_loss
    return seq2seq_loss if model.is_seq2seq else classification_loss


def make_train_step(model, optimizer: optax.GradientTransformation, *, grad_accum_steps: int = 1,
                    remat: bool = False, loss_fn=None, with_teacher: bool = False, skip_nonfinite: bool = False,
                    model_dropout: bool = True):
    """Build `train_step(state, frozen, batch) -> (state, metrics)`; jit it at the call site.

    with_teacher: the step is `train_step(state, frozen, batch, teacher)` and the loss
    function receives the (frozen, distillation) teacher's parameters as a fourth argument.

    With grad_accum_steps = k, every batch array has a leading axis of k micro-batches
    and gradients are summed over them (one optimizer update). `remat` keeps only
    each layer's input for the backward pass, which recomputes the rest layer by layer
    (see `models.base.recomputed_in_backward`): less memory for about one more forward.
    `skip_nonfinite`: a step whose loss or gradient is not finite leaves the state as it was
    (the rng excepted) and reports `skipped` = 1 in its metrics.
    `model_dropout`: the model config's own dropout rates apply in the step, as transformers applies
    them in train mode (`core.dropout`); False trains the model as in eval mode.
    """
    model = model.with_remat(remat)
    # loss_fn(model, params, batch) -> (loss sum, count) or (loss sum, count, {metric: sum}):
    # causal-LM SFT, seq2seq, classification, or an objective of `lowrax.objectives.step_losses`.
    if loss_fn is None:
        loss_fn = task_loss(model)

    def summed_loss(trainable, frozen, batch, rng, teacher):
        """(what is differentiated, (token count, task loss sum, {"penalty": value} or {})). A regulariser of the nodes
        (AdaLoRA's orthogonality term) enters each micro-batch weighted by its token count, so
        the step's gradient is that of mean task loss + regulariser with any accumulation."""
        params = with_dropout_keys(combine(trainable, frozen), rng)
        if model_dropout:
            params = with_model_dropout(params, jax.random.fold_in(rng, MODEL_DROPOUT_STREAM))
        loss_sum, count, *sums = loss_fn(model, params, batch, teacher) if with_teacher else loss_fn(model, params, batch)
        # An objective's own metrics come as sums over the micro-batch, divided by the count like the loss.
        extra = {"sums": sums[0]} if sums else {}
        regulariser = penalty(trainable)
        if regulariser is None:
            return loss_sum, (count, loss_sum, extra)
        return loss_sum + jax.lax.stop_gradient(count) * regulariser, (count, loss_sum, {**extra, "penalty": regulariser})

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def train_step(state: TrainState, frozen: Any, batch: dict, teacher: Any = None):
        rng = jax.random.wrap_key_data(state.rng)
        rng, step_rng = jax.random.split(rng)
        if grad_accum_steps == 1:
            (_, (count, loss_sum, extra)), grads = grad_fn(state.trainable, frozen, batch, step_rng, teacher)
        else:
            def micro(carry, xs):
                micro_batch, i = xs
                (_, (n, l, extra)), g = grad_fn(state.trainable, frozen, micro_batch, jax.random.fold_in(step_rng, i),
                                                teacher)
                acc_l, acc_n, acc_g = carry
                return (acc_l + l, acc_n + n, jax.tree.map(jnp.add, acc_g, g)), extra

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            (loss_sum, count, grads), extras = jax.lax.scan(
                micro, (jnp.zeros(()), jnp.zeros(()), zeros), (batch, jnp.arange(grad_accum_steps)))
            extra = {k: jax.tree.map(lambda x: x.sum(0), v) if k == "sums" else v[0]  # penalty: the same
                     for k, v in extras.items()}                                   # parameters in every micro-batch
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        sums = extra.pop("sums", {})
        metrics = {"loss": loss_sum / count, "tokens": count, **extra, **{k: v / count for k, v in sums.items()}}
        grads = precondition_grads(grads, combine(state.trainable, frozen))  # LoRA-FA's projected B gradient
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        # Delta-LoRA's anchor, COFT's projection, AdaLoRA's rank allocation
        trainable = after_update(optax.apply_updates(state.trainable, updates), state.step + 1, grads)
        new_state = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                               rng=jax.random.key_data(rng))
        metrics["grad_norm"] = optax.tree_utils.tree_norm(grads)
        if skip_nonfinite:
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                (new_state.step, new_state.trainable, new_state.opt_state),
                                (state.step, state.trainable, state.opt_state))
            new_state = new_state.replace(step=kept[0], trainable=kept[1], opt_state=kept[2])
            metrics["skipped"] = (~finite).astype(jnp.float32)
        return new_state, metrics

    return train_step
