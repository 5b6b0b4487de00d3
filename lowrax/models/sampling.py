"""How the next token is chosen from logits (greedy, or sampling with temperature, top-k and top-p), and
the host loop that collects a generation's tokens until every row has stopped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.errors import LowraxError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen: greedy when temperature is 0."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter

    def __post_init__(self):
        for name, ok, expected, value in (("temperature", self.temperature >= 0, ">= 0 (0: greedy)", self.temperature),
                                          ("top_k", self.top_k >= 0, ">= 0 (0 disables it)", self.top_k),
                                          ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]", self.top_p)):
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise LowraxError(f"{name} must be {expected}, got {value}", cli=f"{flag} must be {expected}, got {value}")


def sample_next(logits: jnp.ndarray, key, sampling: SamplingConfig) -> jnp.ndarray:
    """Next token ids [b] from logits [b, vocab]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        drop_sorted = jnp.cumsum(probs, axis=-1) - probs > sampling.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def collect_tokens(first, next_token: Callable, max_new_tokens: int, eos_token_ids: Sequence[int], rng,
                   on_token: Callable[[np.ndarray], None] | None = None) -> list[list[int]]:
    """Each row's new ids: `first` [b], then `next_token(token, i, key)` for i = 0, 1, ... (the model's
    compiled step, which keeps its cache itself), until every row has produced an EOS id or
    `max_new_tokens` are out; each row is cut after its first EOS. on_token: called with each step's
    ids (one per row) as soon as they exist, for streaming."""
    eos = np.asarray(list(eos_token_ids), np.int32)
    out = np.zeros((len(first), max_new_tokens), np.int32)
    done = np.zeros(len(first), bool)
    token = first
    for i in range(max_new_tokens):
        out[:, i] = np.asarray(token)
        if on_token is not None:
            on_token(out[:, i].copy())
        done |= np.isin(out[:, i], eos)
        if done.all() or i == max_new_tokens - 1:
            break
        rng, sub = jax.random.split(rng)
        token = next_token(token, i, sub)
    stops = set(eos.tolist())
    return [row[: next((j + 1 for j, t in enumerate(row) if t in stops), len(row))] for row in out[:, : i + 1].tolist()]
