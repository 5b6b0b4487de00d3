"""Gemma 2: a Llama-family decoder with soft caps, sandwich norms and alternating windows.

Differences from Llama, all in transformers' `Gemma2ForCausalLM`:
- RMSNorm scales by (1 + weight), in float32, and every layer norms four times: before and
  after the attention and before and after the MLP ("sandwich"), the residual added after;
- the word embeddings are scaled by sqrt(hidden_size) (in the weights' dtype);
- attention scores are scaled by query_pre_attn_scalar^-1/2 and soft-capped,
  cap * tanh(score / cap), and so are the final logits;
- layers alternate a sliding window (`layer_types`: "sliding_attention" on even layers by
  default) with full attention;
- the MLP is GeGLU (gelu_pytorch_tanh) and the output head is tied by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lowrax.errors import LowraxError
from lowrax.core.tables import TensorSpec
from lowrax.core import layers
from lowrax.core.linear import attend_to_embedding, embed, linear
from lowrax.models.llama import TENSORS as LLAMA_TENSORS, LlamaConfig, LlamaModel
from lowrax.models.residual import add_residual, site_adapter

_L = "model/layers/{i}"
_K = "model.layers.{i}"
SLIDING, FULL = "sliding_attention", "full_attention"

TENSORS = LLAMA_TENSORS + (
    TensorSpec(f"{_L}/pre_feedforward_layernorm/scale", f"{_K}.pre_feedforward_layernorm.weight", lambda c: (c.hidden_size,)),
    TensorSpec(f"{_L}/post_feedforward_layernorm/scale", f"{_K}.post_feedforward_layernorm.weight",
               lambda c: (c.hidden_size,)),
)


@dataclass(frozen=True)
class Gemma2Config(LlamaConfig):
    """LlamaConfig plus Gemma 2's caps, attention scale and per-layer attention kinds."""

    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple = ()

    @classmethod
    def from_hf(cls, hf: dict) -> "Gemma2Config":
        hf = dict(hf)
        hf.setdefault("tie_word_embeddings", True)
        hf.setdefault("hidden_act", hf.get("hidden_activation", "gelu_pytorch_tanh"))
        base = LlamaConfig.from_hf(hf)
        layers_ = int(hf["num_hidden_layers"])
        kinds = tuple(hf.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(layers_)])
        if len(kinds) != layers_ or set(kinds) - {SLIDING, FULL}:
            raise LowraxError(f"gemma2 layer_types must list {SLIDING!r} or {FULL!r} for each of the {layers_} layers; "
                              f"got {list(kinds)}")
        if hf.get("use_bidirectional_attention"):
            raise LowraxError("gemma2 with use_bidirectional_attention is not supported (lowrax runs it as a causal LM)")
        inherited = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlamaConfig)}
        inherited["sliding_window"] = hf.get("sliding_window", 4096)
        return cls(**inherited, query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                   attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0),
                   final_logit_softcapping=hf.get("final_logit_softcapping", 30.0), layer_types=kinds)


def gemma_rms_norm(x: jnp.ndarray, params: dict, eps: float) -> jnp.ndarray:
    """x / rms(x) * (1 + weight), all in float32, the result in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (1.0 + params["scale"].astype(jnp.float32))).astype(x.dtype)


@dataclass(frozen=True)
class Gemma2Model(LlamaModel):
    """A Gemma 2 causal LM."""

    config: Gemma2Config
    tensor_table = TENSORS
    module_roles = {**LlamaModel.module_roles,
                    "norms": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                              "post_feedforward_layernorm", "norm")}
    peft_default_exceptions = {"gemma2": {"ia3": ("q_proj", "v_proj", "down_proj")}}

    def _attend(self, q, k, v, mask):
        c = self.config
        return layers.attention(q, k, v, mask, c.query_pre_attn_scalar**-0.5, softcap=c.attn_logit_softcapping)

    def _layer(self, p, x, cos, sin, mask, kv, cache_index):
        """Sandwich norms: each sub-block's output is normed again before the residual."""
        attn, kv = self._attention(p["self_attn"], self._norm(x, p["input_layernorm"]), cos, sin, mask, kv, cache_index)
        x = add_residual(self._norm(attn, p["post_attention_layernorm"]), x, site_adapter(p, "attention_adapters"))
        h = self._mlp(p["mlp"], self._norm(x, p["pre_feedforward_layernorm"]))
        return add_residual(self._norm(h, p["post_feedforward_layernorm"]), x, site_adapter(p, "output_adapters")), kv

    def _embed(self, params, input_ids):
        table = params["model"]["embed_tokens"]
        scale = jnp.asarray(self.config.hidden_size**0.5, jnp.float32).astype(table["embedding"].dtype)
        return embed(input_ids, table) * scale

    def _layer_masks(self, query_slots, key_valid) -> list:
        c = self.config
        masks = {FULL: layers.causal_mask(query_slots, key_valid),
                 SLIDING: layers.causal_mask(query_slots, key_valid, c.sliding_window)}
        return [masks[kind] for kind in c.layer_types]

    def _norm(self, x, params):
        return gemma_rms_norm(x, params, self.config.rms_norm_eps)

    def logits_from_hidden(self, params, hidden):
        if self.config.tie_word_embeddings:
            logits = attend_to_embedding(hidden, params["model"]["embed_tokens"])
        else:
            logits = linear(hidden, params["lm_head"])
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap
