"""T5-family encoder-decoders: T5 v1.0, T5 v1.1 and Flan-T5 (`model_type` t5).

Pre-norm blocks with a scale-only RMS norm, unscaled attention scores plus a
learned relative-position bias (bucketed distances; the first block of each
stack holds the table, every block uses it), ReLU or gated-GELU MLPs, one
embedding table shared by both stacks. The decoder's output is scaled by
d_model**-0.5 when the checkpoint was made that way (T5 v1.0's tied head) and
projected by `lm_head` when the file has one (v1.1 / Flan-T5), else by the
shared table. The tree mirrors HF's module names
(`encoder/block/0/layer/0/SelfAttention/q/kernel`), so PEFT's T5 targets
(`q`, `k`, `v`, `o`, `wi`, `wi_0`, `wi_1`, `wo`) name the same modules here.

`apply(params, input_ids, attention_mask, decoder_input_ids=...)` gives the
decoder logits; generation encodes once and decodes with a KV cache
(`models.seq2seq_generate`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field as dc_field
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from lowrax.core.dropout import dropped_out, layer_key, model_dropout_key, site_key
from lowrax.core.node import resolve, virtual_tokens
from lowrax.errors import LowraxError
from lowrax.core.tables import TRANSPOSE, TensorSpec
from lowrax.core import layers
from lowrax.models.base import Model, rows_for_adapters
from lowrax.models.config_utils import field
from lowrax.core.linear import attend_to_embedding, embed, linear


@dataclass(frozen=True)
class T5Config:
    """Architecture hyper-parameters, read from an HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int  # d_model
    head_dim: int  # d_kv
    intermediate_size: int  # d_ff
    num_layers: int  # encoder blocks
    num_decoder_layers: int
    num_heads: int
    relative_buckets: int
    relative_max_distance: int
    layer_norm_eps: float
    gated: bool  # wi_0 / wi_1 (v1.1, Flan-T5) or one wi (v1.0)
    hidden_act: str
    scale_decoder_outputs: bool
    decoder_start_token_id: int
    pad_token_id: int
    eos_token_id: Any
    dropout: float = 0.0  # dropout_rate: embeddings, attention probabilities, sublayer outputs (training steps only)
    hf: dict = dc_field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf: dict) -> "T5Config":
        projection = hf.get("feed_forward_proj", "relu")
        parts = projection.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise LowraxError(f"T5 feed_forward_proj must be 'ACT' or 'gated-ACT' (e.g. relu, gated-gelu), got {projection!r}")
        # transformers maps 'gated-gelu' to the tanh GELU; v5 configs record the choice.
        act = hf.get("dense_act_fn") or ("gelu_new" if projection == "gated-gelu" else parts[-1])
        layers.activation(act)  # refuse an unknown activation now, not at the first forward
        # Original T5 scales the decoder output before its tied head; v1.1 configs say
        # tie_word_embeddings=false, which transformers 5 records as scale_decoder_outputs.
        scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
        num_layers = field(hf, "num_layers")
        pad = int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0)
        start = hf.get("decoder_start_token_id")
        return cls(
            model_type=hf.get("model_type", "t5"),
            vocab_size=field(hf, "vocab_size"),
            hidden_size=field(hf, "d_model"),
            head_dim=field(hf, "d_kv"),
            intermediate_size=field(hf, "d_ff"),
            num_layers=num_layers,
            num_decoder_layers=int(hf.get("num_decoder_layers") or num_layers),
            num_heads=field(hf, "num_heads"),
            relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
            gated=parts[0] == "gated",
            hidden_act=act,
            scale_decoder_outputs=bool(scale),
            decoder_start_token_id=pad if start is None else int(start),
            pad_token_id=pad,
            eos_token_id=hf.get("eos_token_id", 1),
            dropout=float(hf.get("dropout_rate", 0.1)),  # transformers' default where config.json leaves it out
            hf=dict(hf),
        )


def _tensors() -> tuple[TensorSpec, ...]:
    inner = lambda c: c.num_heads * c.head_dim  # noqa: E731
    decoder_layers = lambda c: c.num_decoder_layers  # noqa: E731

    def attention(path, key, layer_count=None):
        into = lambda c: (c.hidden_size, inner(c))  # noqa: E731
        out_of = lambda c: (inner(c), c.hidden_size)  # noqa: E731
        return tuple(TensorSpec(f"{path}/{n}/kernel", f"{key}.{n}.weight", out_of if n == "o" else into, TRANSPOSE,
                                layers=layer_count) for n in ("q", "k", "v", "o"))

    def mlp(path, key, layer_count=None):
        up = lambda c: (c.hidden_size, c.intermediate_size)  # noqa: E731
        return (
            TensorSpec(f"{path}/wi/kernel", f"{key}.wi.weight", up, TRANSPOSE, when=lambda c: not c.gated, layers=layer_count),
            TensorSpec(f"{path}/wi_0/kernel", f"{key}.wi_0.weight", up, TRANSPOSE, when=lambda c: c.gated, layers=layer_count),
            TensorSpec(f"{path}/wi_1/kernel", f"{key}.wi_1.weight", up, TRANSPOSE, when=lambda c: c.gated, layers=layer_count),
            TensorSpec(f"{path}/wo/kernel", f"{key}.wo.weight", lambda c: (c.intermediate_size, c.hidden_size), TRANSPOSE,
                       layers=layer_count),
        )

    def norm(path, key, layer_count=None):
        return (TensorSpec(f"{path}/scale", f"{key}.weight", lambda c: (c.hidden_size,), layers=layer_count),)

    def bias_table(stack):
        return TensorSpec(f"{stack}/block/0/layer/0/SelfAttention/relative_attention_bias/embedding",
                          f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                          lambda c: (c.relative_buckets, c.num_heads))

    E, EK = "encoder/block/{i}/layer", "encoder.block.{i}.layer"
    D, DK, n = "decoder/block/{i}/layer", "decoder.block.{i}.layer", decoder_layers
    return (
        TensorSpec("shared/embedding", "shared.weight", lambda c: (c.vocab_size, c.hidden_size)),
        bias_table("encoder"),
        *attention(f"{E}/0/SelfAttention", f"{EK}.0.SelfAttention"),
        *norm(f"{E}/0/layer_norm", f"{EK}.0.layer_norm"),
        *mlp(f"{E}/1/DenseReluDense", f"{EK}.1.DenseReluDense"),
        *norm(f"{E}/1/layer_norm", f"{EK}.1.layer_norm"),
        *norm("encoder/final_layer_norm", "encoder.final_layer_norm"),
        bias_table("decoder"),
        *attention(f"{D}/0/SelfAttention", f"{DK}.0.SelfAttention", n),
        *norm(f"{D}/0/layer_norm", f"{DK}.0.layer_norm", n),
        *attention(f"{D}/1/EncDecAttention", f"{DK}.1.EncDecAttention", n),
        *norm(f"{D}/1/layer_norm", f"{DK}.1.layer_norm", n),
        *mlp(f"{D}/2/DenseReluDense", f"{DK}.2.DenseReluDense", n),
        *norm(f"{D}/2/layer_norm", f"{DK}.2.layer_norm", n),
        *norm("decoder/final_layer_norm", "decoder.final_layer_norm"),
        # v1.1 / Flan-T5 files carry their own head; tied checkpoints (v1.0) omit it.
        TensorSpec("lm_head/kernel", "lm_head.weight", lambda c: (c.hidden_size, c.vocab_size), TRANSPOSE, optional=True),
    )


@functools.lru_cache(maxsize=None)
def relative_bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of every relative distance (key - query) in [-max_distance, max_distance], as
    transformers' `_relative_position_bucket` computes it (float32 logarithms included, so the
    rounding at the log-spaced boundaries agrees). Beyond max_distance the bucket is the last
    one, so callers clip distances to that range and index this table."""
    relative = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative)
    else:
        distance = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        logs = np.log(distance.astype(np.float32) / np.float32(max_exact))
    scaled = logs / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64), num_buckets - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


@dataclass(frozen=True)
class T5Model(Model):
    """A T5 encoder-decoder; `apply(params, input_ids, attention_mask, decoder_input_ids=...)` gives logits."""

    config: T5Config
    remat: bool = False  # see Model.with_remat
    tensor_table = _tensors()
    is_seq2seq: ClassVar[bool] = True
    logical_axes = {"shared": ("vocab", "embed"), "q": ("embed", "heads"), "k": ("embed", "heads"),
                    "v": ("embed", "heads"), "o": ("heads", "embed"), "wi": ("embed", "mlp"),
                    "wi_0": ("embed", "mlp"), "wi_1": ("embed", "mlp"), "wo": ("mlp", "embed"),
                    "relative_attention_bias": (None, "heads"), "lm_head": ("embed", "vocab")}
    module_roles = {"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",), "mlp_in": ("wi", "wi_0", "wi_1"),
                    "mlp_out": ("wo",), "norms": ("layer_norm", "final_layer_norm"),
                    "embedding": ("shared",)}
    peft_default_exceptions = {"t5": {"adalora": ("q", "k", "v", "o", "wi", "wo"),
                                      "vblora": ("q", "k", "v", "o", "wi", "wo")}}

    # --- pieces ------------------------------------------------------------------------

    def _norm(self, x, p):
        return layers.rms_norm(x, p, self.config.layer_norm_eps)

    def _position_bias(self, table, query_slots, key_length: int, bidirectional: bool):
        """[1, heads, t, s] bias for queries at slots query_slots [t] over keys 0..s-1."""
        c = self.config
        buckets = jnp.asarray(relative_bucket_table(bidirectional, c.relative_buckets, c.relative_max_distance))
        distance = jnp.arange(key_length)[None, :] - query_slots[:, None]
        index = jnp.clip(distance, -c.relative_max_distance, c.relative_max_distance) + c.relative_max_distance
        values = jnp.take(table["embedding"], buckets[index], axis=0)  # [t, s, heads]
        return jnp.transpose(values, (2, 0, 1))[None]

    def _heads(self, x, p):
        b, t, _ = x.shape
        return linear(x, p).reshape(b, t, self.config.num_heads, self.config.head_dim)

    def _attend(self, p, q, k, v, mask, bias, drop=None, site: int = 0):
        """Attention and its output projection, dropped out (sites `site` and `site` + 1) in a training step."""
        # T5 folds the 1/sqrt(d) scale into its initialisation: scores are plain dot products.
        rate = self.config.dropout
        out = layers.attention(q, k, v, mask, 1.0, bias=bias, dropout=(rate, site_key(drop, site)))
        return dropped_out(linear(out, p["o"]), rate, drop, site + 1)

    def _mlp(self, p, x, drop=None):
        name, rate = self.config.hidden_act, self.config.dropout
        if self.config.gated:
            inner = layers.gated_activation(name)(linear(x, p["wi_0"]), linear(x, p["wi_1"]))
        else:
            inner = layers.activation(name)(linear(x, p["wi"]))
        return dropped_out(linear(dropped_out(inner, rate, drop, 4), p["wo"]), rate, drop, 5)

    def _encoder_layer(self, p, x, mask, bias, drop=None):
        a = p["layer"]["0"]
        h = self._norm(x, a["layer_norm"])
        s = a["SelfAttention"]
        x = x + self._attend(s, self._heads(h, s["q"]), self._heads(h, s["k"]), self._heads(h, s["v"]), mask, bias, drop)
        f = p["layer"]["1"]
        return x + self._mlp(f["DenseReluDense"], self._norm(x, f["layer_norm"]), drop)

    def _decoder_layer(self, p, x, self_mask, bias, cross_mask, cross_kv, self_kv, cache_index, drop=None):
        a = p["layer"]["0"]
        h = self._norm(x, a["layer_norm"])
        s = a["SelfAttention"]
        k, v, self_kv = self.update_cache(self_kv, self._heads(h, s["k"]), self._heads(h, s["v"]), cache_index)
        x = x + self._attend(s, self._heads(h, s["q"]), k, v, self_mask, bias, drop)
        c = p["layer"]["1"]
        h = self._norm(x, c["layer_norm"])
        x = x + self._attend(c["EncDecAttention"], self._heads(h, c["EncDecAttention"]["q"]), *cross_kv, cross_mask, None,
                             drop, site=2)
        f = p["layer"]["2"]
        return x + self._mlp(f["DenseReluDense"], self._norm(x, f["layer_norm"]), drop), self_kv

    # --- the two stacks ------------------------------------------------------------------

    def encode(self, params, input_ids, attention_mask=None, adapter_names=None):
        """The encoder's final hidden states [b, s, hidden] (padding positions included)."""
        params = self._resolved(params, adapter_names, input_ids.shape[0])
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        enc, drop = params["encoder"], site_key(model_dropout_key(params), 0)
        x = dropped_out(embed(input_ids, params["shared"]), self.config.dropout, drop, 0)
        t = input_ids.shape[1]
        bias = self._position_bias(enc["block"]["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"],
                                   jnp.arange(t), t, bidirectional=True)
        mask = jnp.broadcast_to(attention_mask.astype(bool)[:, None, :], (x.shape[0], t, t))
        layer = self.layer(self._encoder_layer)
        for i in range(self.config.num_layers):
            x = layer(enc["block"][str(i)], x, mask, bias, layer_key(drop, i))
        return dropped_out(self._norm(x, enc["final_layer_norm"]), self.config.dropout, drop, 1)

    def cross_key_values(self, params, encoder_hidden):
        """Every decoder layer's cross-attention keys and values over the encoder output (computed
        once per generation)."""
        params = resolve(params)
        out = []
        for i in range(self.config.num_decoder_layers):
            cross = params["decoder"]["block"][str(i)]["layer"]["1"]["EncDecAttention"]
            out.append((self._heads(encoder_hidden, cross["k"]), self._heads(encoder_hidden, cross["v"])))
        return out

    def decode(self, params, decoder_input_ids, encoder_mask, cross_kv, cache=None, cache_index=None,
               decoder_attention_mask=None):
        """(decoder hidden states [b, t, hidden] after the final norm, updated self-attention cache).

        cross_kv: `cross_key_values` of the encoder output; encoder_mask [b, s]: its padding.
        With a cache (`init_cache`), the t tokens take slots cache_index.. and attend over every
        written slot; without one they attend causally over themselves."""
        params = resolve(params)
        dec, drop = params["decoder"], site_key(model_dropout_key(params), 1)
        x = dropped_out(embed(decoder_input_ids, params["shared"]), self.config.dropout, drop, 0)
        b, t = decoder_input_ids.shape
        key_length = t if cache is None else cache[0][0].shape[1]
        start = 0 if cache_index is None else cache_index
        slots = start + jnp.arange(t)
        bias = self._position_bias(dec["block"]["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"],
                                   slots, key_length, bidirectional=False)
        key_valid = (jnp.ones((b, key_length), bool) if decoder_attention_mask is None or cache is not None
                     else decoder_attention_mask.astype(bool))
        self_mask = layers.causal_mask(jnp.broadcast_to(slots[None], (b, t)), key_valid)
        cross_mask = jnp.broadcast_to(encoder_mask.astype(bool)[:, None, :], (b, t, encoder_mask.shape[1]))
        layer = self.layer(self._decoder_layer)
        new_cache = [] if cache is not None else None
        for i in range(self.config.num_decoder_layers):
            kv = None if cache is None else cache[i]
            x, kv = layer(dec["block"][str(i)], x, self_mask, bias, cross_mask, cross_kv[i], kv, cache_index,
                          layer_key(drop, i))
            if new_cache is not None:
                new_cache.append(kv)
        return dropped_out(self._norm(x, dec["final_layer_norm"]), self.config.dropout, drop, 1), new_cache

    def logits_from_hidden(self, params, hidden):
        if self.config.scale_decoder_outputs:
            hidden = hidden * (self.config.hidden_size ** -0.5)
        if "lm_head" in params:
            return linear(hidden, params["lm_head"])
        return attend_to_embedding(hidden, params["shared"])

    def apply(self, params, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
              adapter_names=None):
        """Decoder logits [b, t_dec, vocab] for inputs [b, s] and decoder_input_ids [b, t_dec] (the
        targets shifted right behind `decoder_start_token_id`, as `shift_right` makes them)."""
        if decoder_input_ids is None:
            raise LowraxError("T5 is an encoder-decoder: apply(params, input_ids, attention_mask, "
                              "decoder_input_ids=...) needs the decoder's input (the targets shifted right)")
        params = self._resolved(params, adapter_names, input_ids.shape[0])
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        encoded = self.encode(params, input_ids, attention_mask)
        hidden, _ = self.decode(params, decoder_input_ids, attention_mask, self.cross_key_values(params, encoded),
                                decoder_attention_mask=decoder_attention_mask)
        return self.logits_from_hidden(params, hidden)

    def shift_right(self, labels):
        """decoder_input_ids for target ids [b, t]: decoder_start_token_id, then labels[:, :-1]."""
        start = jnp.full(labels.shape[:1] + (1,), self.config.decoder_start_token_id, labels.dtype)
        return jnp.concatenate([start, labels[:, :-1]], axis=1)

    def _resolved(self, params, adapter_names, batch: int):
        params = resolve(rows_for_adapters(params, adapter_names, batch))
        prompt = virtual_tokens(params)
        if prompt is not None:
            raise LowraxError(f"{prompt.peft_type} on T5 is not supported: lowrax places virtual tokens for "
                              "decoder-only LMs and BERT encoders")
        return params

    def word_embedding_table(self, params):
        return params["shared"]["embedding"]

    # --- generation -------------------------------------------------------------------

    def init_cache(self, batch: int, length: int, dtype=jnp.float32):
        """An empty decoder self-attention cache for `batch` sequences of up to `length` tokens."""
        shape = (batch, length, self.config.num_heads, self.config.head_dim)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.config.num_decoder_layers)]
