"""Losses of the next-token distribution through the vocabulary head without keeping its logits.

    losses, aux = head_position_losses(head, params, hidden, loss_of_logits, inputs, constants)
    logps = head_target_logps(head, params, hidden, targets)        # the fused cross-entropy

The forward runs the head over blocks of positions (`jax.vjp` of the model's own head, so a tied
embedding, a LoRA'd `lm_head`, a final soft cap or an NF4 head all work); the full [n, K, V] logits,
their exponentials and their gradient (at 4 x 256 tokens on SmolLM2, 200 MB each) never exist.
`loss_of_logits(logits [n, c, V], constants, *input blocks [n, c, ...]) -> (loss [n, c], aux)` is any
function of one block of positions: log p(target) for SFT and preference objectives; for distillation the
divergence from a teacher whose logits come from an input (its hidden states, or stored logits) and
`constants` (its parameters). Inputs and constants are not differentiated; `aux` carries no gradient.

- A frozen head (the usual case: LoRA on the layers, not on `lm_head`): each loss is a function of its
  own position's hidden state only, so the forward also pushes d loss / d logits back through the head,
  block by block, and keeps that [n, K, H] gradient with respect to the hidden state. The backward
  scales it by the incoming gradient: no logits (nor a teacher's) are recomputed, and the head costs two
  matmuls, as in plain differentiation.
- A trained head: its parameter gradient needs the incoming gradient, so the forward keeps nothing of the
  logits and the backward recomputes one block at a time, pulling the incoming gradient back to the
  head's trained leaves and the hidden states: one more head matmul. The head's parameters get
  gradients only where the step trains them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from lowrax.core.layers import join_blocks, split_blocks

BLOCK_BYTES = 16 << 20  # float32 logits per block


def _leaves_read(fn, leaves) -> list[int]:
    """Indices of the leaves fn(leaves) reads (any operation on them); the others are never touched."""
    closed = jax.make_jaxpr(fn)(leaves)
    invars = closed.jaxpr.invars
    read = set()

    for eqn in closed.jaxpr.eqns:  # a leaf handed to a nested call counts as read, used there or not
        read.update(id(v) for v in eqn.invars)
    read.update(id(v) for v in closed.jaxpr.outvars)
    return [i for i, v in enumerate(invars) if id(v) in read]


def target_logps(logits, targets) -> jnp.ndarray:
    """log p(target) [...] from logits [..., V] and targets [...]: logit[target] - logsumexp(logits),
    without materialising every log-probability."""
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)


def head_target_logps(head, params, hidden, targets, block_bytes: int | None = None) -> jnp.ndarray:
    """log p(target) [n, K] from hidden states [n, K, H] and targets [n, K], where
    head(params, hidden [n, c, H]) -> float32 logits [n, c, V]; the logits exist `block_bytes` (default
    BLOCK_BYTES) at a time."""
    return head_position_losses(head, params, hidden, lambda logits, _, t: (target_logps(logits, t), ()), (targets,),
                                block_bytes=block_bytes)[0]


def _head_over_read_leaves(head, params, probe):
    """(head_of(leaves, h), the leaves of params the head reads, its vocabulary size): the head as a function
    of only the parameter leaves it reads, so that a custom VJP's residuals and gradients cover those alone.
    probe: hidden states [n, 1, H] of the right shape and type."""
    leaves, treedef = jax.tree.flatten(params)
    read = _leaves_read(lambda lv: head(treedef.unflatten(lv), probe), leaves)
    unread = set(range(len(leaves))) - set(read)
    # Leaves the head never reads are left out of the differentiated call; zeros of their shape stand in
    # for them (code may still look at them, a no-op astype say). Under jit they are unused constants that
    # XLA drops; called eagerly this allocates them, so eager callers should pass only the head's subtree.
    stand_ins = [_stand_in(x) if i in unread else None for i, x in enumerate(leaves)]

    def head_of(read_leaves, h):
        full = list(stand_ins)
        for i, x in zip(read, read_leaves):
            full[i] = x
        return head(treedef.unflatten(full), h)

    read_leaves = [leaves[i] for i in read]
    return head_of, read_leaves, jax.eval_shape(head_of, read_leaves, probe).shape[-1]


def _position_block(shape, vocab: int, block_bytes: int | None = None) -> int:
    """Positions per block for hidden states of `shape` [n, K, H]: n x block float32 logits fit block_bytes."""
    n, k, _ = shape
    return int(max(1, min(k, (block_bytes or BLOCK_BYTES) // (4 * n * vocab))))


def _stand_in(x):
    """Zeros shaped and typed like x (a PRNG key array: keys made from zero data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.random.wrap_key_data(jnp.zeros(data.shape, data.dtype), impl=jax.random.key_impl(x))
    return jnp.zeros(np.shape(x), x.dtype)


def _trained(primal: CustomVJPPrimal) -> bool:
    """Whether a custom VJP's primal is differentiated (a floating array the step trains)."""
    return primal.perturbed and jnp.issubdtype(primal.value.dtype, jnp.inexact)


def head_position_losses(head, params, hidden, loss_of_logits, inputs: tuple, constants=None,
                         block_bytes: int | None = None):
    """(loss [n, K], aux) of `loss_of_logits` over hidden states [n, K, H] and `inputs` (arrays [n, K, ...]),
    where head(params, hidden [n, c, H]) -> float32 logits [n, c, V]; see the module's docstring."""
    head_of, leaves, vocab = _head_over_read_leaves(head, params, hidden[:, :1])
    block = _position_block(hidden.shape, vocab, block_bytes)
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
    if not any(_trained(x) for x in leaves):
        loss, aux, grad_h = _blocks(head_of, loss_of_logits, block, [x.value for x in leaves], hidden.value, inputs,
                                    constants, input_gradient=True)
        # the leaves' count reaches the backward as the residuals' structure (a list of empty entries)
        return (loss, aux), {"input_gradient": grad_h, "leaves": [None] * len(leaves),
                             "no_gradient": _no_gradient(inputs, constants)}
    loss, aux = _blocks(head_of, loss_of_logits, block, [x.value for x in leaves], hidden.value, inputs, constants)
    # which leaves the step trains is static: it reaches the backward as each leaf's one-entry dict's key
    roles = [{"trained" if _trained(x) else "frozen": x.value} for x in leaves]
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
