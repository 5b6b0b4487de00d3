"""log p(target) through the vocabulary head without keeping its logits: a fused cross-entropy.

The forward runs the head over blocks of positions and keeps, per position, only the log-sum-exp of
its logits. The backward recomputes one block's logits at a time, turns them into the gradient
`g * (onehot(target) - softmax)` in place and pushes it through the head (`jax.vjp` of the model's
own head, so a tied embedding, a LoRA'd `lm_head`, a final soft cap or an NF4 head all work). Peak
memory is a few blocks of logits instead of the whole [n, K, V] array, its exponentials and its
gradient (at 4 x 256 tokens on SmolLM2, 200 MB each); the price is one more head matmul in the
backward. The head's parameters get gradients only where the step trains them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

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


def head_target_logps(head, params, hidden, targets, block_bytes: int = BLOCK_BYTES) -> jnp.ndarray:
    """log p(target) [n, K] from hidden states [n, K, H] and targets [n, K], where
    head(params, hidden [n, c, H]) -> float32 logits [n, c, V]."""
    leaves, treedef = jax.tree.flatten(params)
    probe = hidden[:, :1]
    read = _leaves_read(lambda lv: head(treedef.unflatten(lv), probe), leaves)
    # Leaves the head never reads are left out of the differentiated call; zeros of their shape stand in
    # for them (code may still look at them, a no-op astype say; XLA drops the unused constants).
    def head_of(read_leaves, h):
        full = [_stand_in(x) for x in leaves]
        for i, x in zip(read, read_leaves):
            full[i] = x
        return head(treedef.unflatten(full), h)

    n, k, _ = hidden.shape
    vocab = jax.eval_shape(head_of, [leaves[i] for i in read], probe).shape[-1]
    block = int(max(1, min(k, block_bytes // (4 * n * vocab))))
    return _fused(head_of, block, [leaves[i] for i in read], hidden, targets)


def _stand_in(x):
    """Zeros shaped and typed like x (a PRNG key array: keys made from zero data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.random.wrap_key_data(jnp.zeros(data.shape, data.dtype), impl=jax.random.key_impl(x))
    return jnp.zeros(np.shape(x), x.dtype)


def _blocks(x, block):
    """[n, K, ...] -> [blocks, n, block, ...], zero-padded at the end."""
    n, k = x.shape[:2]
    count = -(-k // block)
    x = jnp.pad(x, [(0, 0), (0, count * block - k)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(n, count, block, *x.shape[2:]), 1, 0)


def _unblocks(y, k):
    """[blocks, n, block, ...] -> [n, K, ...]."""
    return jnp.moveaxis(y, 0, 1).reshape(y.shape[1], -1, *y.shape[3:])[:, :k]


def _forward_blocks(head_of, block, leaves, hidden, targets):
    def one(_, xs):
        h, t = xs
        logits = head_of(leaves, h)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return None, (jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse, lse)

    _, (logps, lse) = jax.lax.scan(one, None, (_blocks(hidden, block), _blocks(targets, block)))
    k = hidden.shape[1]
    return _unblocks(logps, k), _unblocks(lse, k)


def _fused(head_of, block, leaves, hidden, targets):
    return _forward_blocks(head_of, block, leaves, hidden, targets)[0]


_fused = jax.custom_vjp(_fused, nondiff_argnums=(0, 1))


def _fused_forward(head_of, block, leaves, hidden, targets):
    values = [x.value for x in leaves]
    logps, lse = _forward_blocks(head_of, block, values, hidden.value, targets.value)
    # Which leaves the step trains is static; it reaches the backward as the residuals' structure
    # (a dict keyed "trained i" / "frozen i").
    by_role = {f"{'trained' if _trained(x) else 'frozen'} {i}": x.value for i, x in enumerate(leaves)}
    return logps, (by_role, hidden.value, targets.value, lse)


def _trained(primal: CustomVJPPrimal) -> bool:
    return primal.perturbed and jnp.issubdtype(primal.value.dtype, jnp.inexact)


def _fused_backward(head_of, block, saved, grad):
    by_role, hidden, targets, lse = saved
    if isinstance(grad, SymbolicZero):
        grad = jnp.zeros(hidden.shape[:2], jnp.float32)
    values = [None] * len(by_role)
    for name, x in by_role.items():
        values[int(name.split()[1])] = x
    trained_at = sorted(int(name.split()[1]) for name in by_role if name.startswith("trained"))

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
    grad_values, grad_h = jax.lax.scan(one, zeros, tuple(_blocks(x, block) for x in (hidden, targets, lse, grad)))
    grads = [None] * len(values)
    for i, g in zip(trained_at, grad_values):
        grads[i] = g
    return grads, _unblocks(grad_h, hidden.shape[1]), None


_fused.defvjp(_fused_forward, _fused_backward, symbolic_zeros=True)
