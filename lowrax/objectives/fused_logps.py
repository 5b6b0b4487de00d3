"""log p(target) through the vocabulary head without keeping its logits: a fused cross-entropy.

The forward runs the head over blocks of positions (`jax.vjp` of the model's own head, so a tied
embedding, a LoRA'd `lm_head`, a final soft cap or an NF4 head all work); the full [n, K, V] logits,
their exponentials and their gradient (at 4 x 256 tokens on SmolLM2, 200 MB each) never exist.

- A frozen head (the usual case: LoRA on the layers, not on `lm_head`): each log p(target) is a
  function of its own position's hidden state only, so the forward also pushes `onehot(target) -
  softmax` back through the head, block by block, and keeps that [n, K, H] gradient of log p with
  respect to the hidden state. The backward scales it by the incoming gradient: no logits are
  recomputed, and the head costs two matmuls, as in plain differentiation.
- A trained head: its parameter gradient needs the incoming gradient, so the forward keeps only each
  position's log-sum-exp and the backward recomputes one block's logits at a time, turns them into
  `g * (onehot(target) - softmax)` in place and pushes that through the head: one more head matmul.
  The head's parameters get gradients only where the step trains them.
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


def head_target_logps(head, params, hidden, targets, block_bytes: int | None = None) -> jnp.ndarray:
    """log p(target) [n, K] from hidden states [n, K, H] and targets [n, K], where
    head(params, hidden [n, c, H]) -> float32 logits [n, c, V]; the logits exist `block_bytes` (default
    BLOCK_BYTES) at a time."""
    head_of, leaves, vocab = head_over_read_leaves(head, params, hidden[:, :1])
    return _fused(head_of, position_block(hidden.shape, vocab, block_bytes), leaves, hidden, targets)


def head_over_read_leaves(head, params, probe):
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


def position_block(shape, vocab: int, block_bytes: int | None = None) -> int:
    """Positions per block for hidden states of `shape` [n, K, H]: n x block float32 logits fit block_bytes."""
    n, k, _ = shape
    return int(max(1, min(k, (block_bytes or BLOCK_BYTES) // (4 * n * vocab))))


def _stand_in(x):
    """Zeros shaped and typed like x (a PRNG key array: keys made from zero data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.random.wrap_key_data(jnp.zeros(data.shape, data.dtype), impl=jax.random.key_impl(x))
    return jnp.zeros(np.shape(x), x.dtype)


def _forward_blocks(head_of, block, leaves, hidden, targets, input_gradient: bool = False):
    """(log p [n, K], per position the log-sum-exp [n, K]) by blocks of positions; with input_gradient,
    d log p / d hidden [n, K, H] in the log-sum-exp's place (for a head whose parameters are not trained)."""
    def one(_, xs):
        h, t = xs
        if input_gradient:
            logits, pull_back = jax.vjp(lambda h: head_of(leaves, h), h)
        else:
            logits = head_of(leaves, h)
        lse = jax.nn.logsumexp(logits, axis=-1)
        logps = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse
        if not input_gradient:
            return None, (logps, lse)
        (grad_h,) = pull_back(jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype) - jnp.exp(logits - lse[..., None]))
        return None, (logps, grad_h)

    _, (logps, second) = jax.lax.scan(one, None, (split_blocks(hidden, block), split_blocks(targets, block)))
    k = hidden.shape[1]
    return join_blocks(logps, k), join_blocks(second, k)


def _fused(head_of, block, leaves, hidden, targets):
    return _forward_blocks(head_of, block, leaves, hidden, targets)[0]


_fused = jax.custom_vjp(_fused, nondiff_argnums=(0, 1))


def _fused_forward(head_of, block, leaves, hidden, targets):
    if not any(trained(x) for x in leaves):
        logps, grad_h = _forward_blocks(head_of, block, [x.value for x in leaves], hidden.value, targets.value,
                                        input_gradient=True)
        # the leaves' count reaches the backward as the residuals' structure (a list of empty entries)
        return logps, {"input_gradient": grad_h, "leaves": [None] * len(leaves)}
    logps, lse = _forward_blocks(head_of, block, [x.value for x in leaves], hidden.value, targets.value)
    # Which leaves the step trains is static; it reaches the backward in the residuals' structure: each
    # leaf's value sits in a one-entry dict keyed by its role.
    roles = [{"trained" if trained(x) else "frozen": x.value} for x in leaves]
    return logps, (roles, hidden.value, targets.value, lse)


def trained(primal: CustomVJPPrimal) -> bool:
    """Whether a custom VJP's primal is differentiated (a floating array the step trains)."""
    return primal.perturbed and jnp.issubdtype(primal.value.dtype, jnp.inexact)


def _fused_backward(head_of, block, saved, grad):
    if isinstance(saved, dict):  # a frozen head: the forward kept d log p / d hidden
        grad_h = saved["input_gradient"]
        no_leaf_gradients = [None] * len(saved["leaves"])
        if isinstance(grad, SymbolicZero):
            return no_leaf_gradients, jnp.zeros_like(grad_h), None
        return no_leaf_gradients, (grad[..., None] * grad_h).astype(grad_h.dtype), None
    roles, hidden, targets, lse = saved
    if isinstance(grad, SymbolicZero):
        grad = jnp.zeros(hidden.shape[:2], jnp.float32)
    values = [next(iter(role.values())) for role in roles]
    trained_at = [i for i, role in enumerate(roles) if "trained" in role]

    def head_of_trained(trained_values, h):
        full = list(values)
        for i, x in zip(trained_at, trained_values):
            full[i] = x
        return head_of(full, h)

    def one(accumulated, xs):
        h, t, m, g = xs
        logits, pull_back = jax.vjp(head_of_trained, [values[i] for i in trained_at], h)
        probs = jnp.exp(logits - m[..., None])
        grad_logits = g[..., None] * (jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype) - probs)
        grad_values, grad_h = pull_back(grad_logits)
        return jax.tree.map(jnp.add, accumulated, grad_values), grad_h

    zeros = [jnp.zeros_like(values[i]) for i in trained_at]
    blocked = tuple(split_blocks(x, block) for x in (hidden, targets, lse, grad))
    grad_values, grad_h = jax.lax.scan(one, zeros, blocked)
    grads = [None] * len(values)
    for i, g in zip(trained_at, grad_values):
        grads[i] = g
    return grads, join_blocks(grad_h, hidden.shape[1]), None


_fused.defvjp(_fused_forward, _fused_backward, symbolic_zeros=True)
