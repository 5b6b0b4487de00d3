"""The prompt-learning node types. One node sits at the tree's top-level key
`prompt_encoder` (`adapters.node.VIRTUAL_TOKENS_KEY`); the causal-LM forward reads it
(`models.base.CausalLM`): prompt tuning and P-tuning give `prompt_embeddings()` [v, hidden],
put before the input's word embeddings; prefix tuning gives `prefix_key_values()`, one
(keys, values) pair [v, kv_heads, head_dim] per layer, put before the attention's.

The virtual tokens are the same for every sequence, so each node computes them once per
step, not per row. They live in the input, not the weights: the nodes cannot be merged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.core.dropout import inverted_dropout
from lowrax.core.node import PROMPT, AdapterNode
from lowrax.errors import LowraxError


class PromptNode(AdapterNode):
    """What the three node types share. Subclasses have an `embeddings` [v, ...] field."""

    mergeable = False

    def switched_off(self):
        return None  # no virtual tokens

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def field_labels(self) -> dict:
        return {f: PROMPT for f in self.trained_fields}

    def field_axes(self) -> dict:
        return {}  # small tables, replicated (dist.sharding)

    def apply(self, x):
        raise LowraxError(f"{type(self).__name__} adds virtual tokens to the input; it is not a linear layer")

    def prompt_embeddings(self):
        return None

    def prefix_key_values(self):
        return None

    def dimensions(self, model) -> list[tuple[str, int, int]]:
        """(what, the adapter's, the model's) for each dimension that must agree: here the hidden
        size of virtual-token embeddings (prefix tuning overrides it)."""
        return [("hidden size", self.embeddings.shape[1], model.config.hidden_size)]

    def check_model(self, model) -> None:
        """A clear error when the adapter was made for a model of other dimensions."""
        for what, ours, theirs in self.dimensions(model):
            if ours != theirs:
                raise LowraxError(f"this {self.peft_type} adapter has {what} {ours}, the model {theirs}; "
                                  "it was made for another model")


def mlp(x: jnp.ndarray, layers: dict, activation) -> jnp.ndarray:
    """torch Sequential(Linear, act, Linear, act, ..., Linear) with layers {"0": {...}, "2": ...}."""
    names = sorted(layers, key=int)
    for i, name in enumerate(names):
        x = x @ layers[name]["kernel"] + layers[name]["bias"]
        if i < len(names) - 1:
            x = activation(x)
    return x


def lstm_direction(x: jnp.ndarray, p: dict, reverse: bool) -> jnp.ndarray:
    """One direction of torch's LSTM over x [t, in] from zero state: gates (i, f, g, o)."""
    hidden = p["w_hh"].shape[0]
    inputs = x @ p["w_ih"] + p["bias"]  # [t, 4h], the input part of every step at once

    def step(carry, gate_in):
        h, c = carry
        i, f, g, o = jnp.split(gate_in + h @ p["w_hh"], 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), x.dtype)
    _, out = jax.lax.scan(step, (zeros, zeros), inputs, reverse=reverse)
    return out


def bidirectional_lstm(x: jnp.ndarray, layers: dict, dropout: float, key) -> jnp.ndarray:
    """torch.nn.LSTM(bidirectional=True) over x [t, in]: each layer's output [t, 2h] feeds the
    next, with dropout between layers when training (a key attached)."""
    count = len(layers) // 2
    for i in range(count):
        x = jnp.concatenate([lstm_direction(x, layers[f"l{i}"], False),
                             lstm_direction(x, layers[f"l{i}_reverse"], True)], axis=-1)
        if key is not None and dropout > 0 and i < count - 1:
            x = inverted_dropout(x, dropout, jax.random.fold_in(key, i))
    return x


@struct.dataclass
class PromptTable(PromptNode):
    """Prompt tuning: the virtual tokens' embeddings themselves, [v, hidden]."""

    embeddings: jnp.ndarray
    base: Any = None
    peft_type = "PROMPT_TUNING"
    trained_fields = ("embeddings",)

    def prompt_embeddings(self):
        return self.embeddings


@struct.dataclass
class PromptEncoder(PromptNode):
    """P-tuning: an MLP of a learned table, or of a bidirectional LSTM's reading of it."""

    embeddings: jnp.ndarray  # [v, hidden]
    mlp_head: dict  # torch Sequential indices -> {"kernel" [in, out], "bias" [out]}
    lstm_head: dict | None = None  # "l0", "l0_reverse", ... -> {"w_ih" [in, 4h], "w_hh" [h, 4h], "bias" [4h]}
    dropout_key: Any = None
    base: Any = None
    encoder_dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "P_TUNING"
    trained_fields = ("embeddings", "mlp_head", "lstm_head")

    @property
    def dropout(self) -> float:
        return self.encoder_dropout if self.lstm_head is not None else 0.0

    def prompt_embeddings(self):
        x = self.embeddings.astype(jnp.float32)
        if self.lstm_head is not None:
            x = bidirectional_lstm(x, self.lstm_head, self.encoder_dropout, self.dropout_key)
        return mlp(x, self.mlp_head, jax.nn.relu)


@struct.dataclass
class PrefixEncoder(PromptNode):
    """Prefix tuning: keys and values for every layer, [v, layers * 2 * kv_heads * head_dim]
    (PEFT's layout: layer, then key/value, then head, then dim), or a tanh MLP of a
    [v, hidden] table giving them (`prefix_projection`)."""

    embeddings: jnp.ndarray
    transform: dict | None = None  # {"0": Linear(hidden, encoder_hidden), "2": Linear(encoder_hidden, width)}
    base: Any = None
    num_layers: int = struct.field(pytree_node=False, default=1)
    kv_heads: int = struct.field(pytree_node=False, default=1)
    head_dim: int = struct.field(pytree_node=False, default=1)
    peft_type = "PREFIX_TUNING"
    trained_fields = ("embeddings", "transform")

    def flat(self) -> jnp.ndarray:
        """[v, layers * 2 * kv_heads * head_dim]: what PEFT saves as `prompt_embeddings`."""
        x = self.embeddings.astype(jnp.float32)
        return x if self.transform is None else mlp(x, self.transform, jnp.tanh)

    def prefix_key_values(self):
        x = self.flat().reshape(self.num_virtual_tokens, self.num_layers * 2, self.kv_heads, self.head_dim)
        return [(x[:, 2 * i], x[:, 2 * i + 1]) for i in range(self.num_layers)]

    def dimensions(self, model):
        refuse_encoder_prefix(model)
        kv_heads, head_dim = model.kv_shape(1, 1)[2:]
        return [("layers", self.num_layers, model.config.num_layers), ("key/value heads", self.kv_heads, kv_heads),
                ("head size", self.head_dim, head_dim)]


def refuse_encoder_prefix(model) -> None:
    """PEFT 0.21 gives BERT its prefix as past_key_values, which transformers 5's BertModel no longer
    takes (it is `cache` now): PEFT fails there, so lowrax has no reference to be equal to."""
    if model is None or getattr(model, "is_causal_lm", True):
        return
    if model.is_seq2seq or model.is_image_model:
        kind = "an encoder-decoder" if model.is_seq2seq else "an image encoder"
        raise LowraxError(f"prefix tuning is implemented for decoder LMs; {model.model_type} is {kind}: use LoRA "
                          "or another per-layer method")
    raise LowraxError(f"prefix tuning on BERT-family encoders ({model.model_type}) is refused: PEFT 0.21 cannot run "
                      "it with transformers 5 (BertModel takes `cache`, not past_key_values), so there is no "
                      "reference to match; use prompt tuning or P-tuning on encoders")
