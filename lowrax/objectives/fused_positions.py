"""Per-position losses of whole next-token distributions (distillation) through the vocabulary head, by
blocks of positions, with a custom VJP: the student's [n, K, V] logits, and the teacher's, exist one block
at a time in the forward and in the backward.

    losses, aux = head_position_losses(head, params, hidden, loss_of_logits, inputs, constants)

`loss_of_logits(logits [n, c, V], constants, *input blocks [n, c, ...]) -> (loss [n, c], aux)` is any
function of one block of positions: the teacher's logits come from an input (the teacher's hidden states,
or its stored logits) and `constants` (the teacher's parameters), neither differentiated; `aux` (metrics of
the same positions) carries no gradient.

- A frozen head (LoRA on the layers, not on `lm_head`): the forward pushes d loss / d logits back through
  the head block by block and keeps d loss / d hidden [n, K, H]; the backward only scales it. Neither the
  student's logits nor the teacher's are computed twice.
- A trained head: the forward keeps nothing of the logits; the backward recomputes one block (student and
  teacher) at a time and pulls the incoming gradient back to the head's trained leaves and the hidden states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from lowrax.core.layers import join_blocks, split_blocks
from lowrax.objectives.fused_logps import head_over_read_leaves, position_block, trained


def head_position_losses(head, params, hidden, loss_of_logits, inputs: tuple, constants=None,
                         block_bytes: int | None = None):
    """(loss [n, K], aux) of `loss_of_logits` over hidden states [n, K, H] and `inputs` (arrays [n, K, ...]),
    where head(params, hidden [n, c, H]) -> float32 logits [n, c, V]; see the module's docstring."""
    head_of, leaves, vocab = head_over_read_leaves(head, params, hidden[:, :1])
    block = position_block(hidden.shape, vocab, block_bytes)
    return _losses(head_of, loss_of_logits, block, leaves, hidden, tuple(inputs), constants)


def _blocks(head_of, loss_of_logits, block, leaves, hidden, inputs, constants, input_gradient: bool = False):
    """(loss, aux) by blocks of positions; with input_gradient also d loss / d hidden [n, K, H]."""
    def one(_, xs):
        h, blocks = xs
        if not input_gradient:
            loss, aux = loss_of_logits(head_of(leaves, h), constants, *blocks)
            return None, (loss, aux)
        logits, pull_head = jax.vjp(lambda h: head_of(leaves, h), h)
        loss, pull_loss, aux = jax.vjp(lambda lg: loss_of_logits(lg, constants, *blocks), logits, has_aux=True)
        (grad_h,) = pull_head(pull_loss(jnp.ones_like(loss))[0])
        return None, (loss, aux, grad_h)

    blocked = (split_blocks(hidden, block), tuple(split_blocks(x, block) for x in inputs))
    _, out = jax.lax.scan(one, None, blocked)
    return jax.tree.map(lambda y: join_blocks(y, hidden.shape[1]), out)


def _losses(head_of, loss_of_logits, block, leaves, hidden, inputs, constants):
    return _blocks(head_of, loss_of_logits, block, leaves, hidden, inputs, constants)


_losses = jax.custom_vjp(_losses, nondiff_argnums=(0, 1, 2))


def _values(tree):
    return jax.tree.map(lambda x: x.value, tree)


def _losses_forward(head_of, loss_of_logits, block, leaves, hidden, inputs, constants):
    inputs, constants = _values(inputs), _values(constants)
    if not any(trained(x) for x in leaves):
        loss, aux, grad_h = _blocks(head_of, loss_of_logits, block, [x.value for x in leaves], hidden.value, inputs,
                                    constants, input_gradient=True)
        # the leaves' count reaches the backward as the residuals' structure (a list of empty entries)
        return (loss, aux), {"input_gradient": grad_h, "leaves": [None] * len(leaves),
                             "no_gradient": _no_gradient(inputs, constants)}
    loss, aux = _blocks(head_of, loss_of_logits, block, [x.value for x in leaves], hidden.value, inputs, constants)
    # which leaves the step trains is static: it reaches the backward as each leaf's one-entry dict's key
    roles = [{"trained" if trained(x) else "frozen": x.value} for x in leaves]
    return (loss, aux), (roles, hidden.value, inputs, constants)


def _no_gradient(inputs, constants):
    """The cotangents of the inputs and constants: none (zeros), in their structure (no arrays kept)."""
    return jax.tree.map(lambda _: None, inputs), jax.tree.map(lambda _: None, constants)


def _losses_backward(head_of, loss_of_logits, block, saved, grad):
    grad_loss = grad[0]  # the aux outputs carry no gradient
    if isinstance(saved, dict):  # a frozen head: the forward kept d loss / d hidden
        grad_h = saved["input_gradient"]
        no_leaf_gradients = [None] * len(saved["leaves"])
        if isinstance(grad_loss, SymbolicZero):
            grad_hidden = jnp.zeros_like(grad_h)
        else:
            grad_hidden = (grad_loss[..., None] * grad_h).astype(grad_h.dtype)
        return no_leaf_gradients, grad_hidden, *saved["no_gradient"]
    roles, hidden, inputs, constants = saved
    if isinstance(grad_loss, SymbolicZero):
        grad_loss = jnp.zeros(hidden.shape[:2], jnp.float32)
    values = [next(iter(role.values())) for role in roles]
    trained_at = [i for i, role in enumerate(roles) if "trained" in role]

    def block_loss(trained_values, h, blocks):
        full = list(values)
        for i, x in zip(trained_at, trained_values):
            full[i] = x
        return loss_of_logits(head_of(full, h), constants, *blocks)[0]

    def one(accumulated, xs):
        h, blocks, g = xs
        _, pull_back = jax.vjp(lambda trained_values, h: block_loss(trained_values, h, blocks),
                               [values[i] for i in trained_at], h)
        grad_values, grad_h = pull_back(g)
        return jax.tree.map(jnp.add, accumulated, grad_values), grad_h

    zeros = [jnp.zeros_like(values[i]) for i in trained_at]
    blocked = (split_blocks(hidden, block), tuple(split_blocks(x, block) for x in inputs), split_blocks(grad_loss, block))
    grad_values, grad_h = jax.lax.scan(one, zeros, blocked)
    grads = [None] * len(values)
    for i, g in zip(trained_at, grad_values):
        grads[i] = g
    return grads, join_blocks(grad_h, hidden.shape[1]), *_no_gradient(inputs, constants)


_losses.defvjp(_losses_forward, _losses_backward, symbolic_zeros=True)
