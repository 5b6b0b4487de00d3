"""Llama-family decoder: Llama 2/3, Mistral and Qwen2-style models.

RMSNorm, rotary embeddings (default, linear and llama3 scaling), grouped-query
attention with optional q/k/v bias (Qwen2) and sliding window (Mistral),
SwiGLU MLP, tied or untied output embeddings. Parameters are a nested dict
with HF-shaped names (`model/layers/0/self_attn/q_proj/kernel`), kernels laid
out (in, out).
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Any

from lowrax.core.tables import TRANSPOSE, TensorSpec
from lowrax.core import layers
from lowrax.models.base import CausalLM
from lowrax.models.config_utils import field, rope_settings
from lowrax.core.linear import attend_to_embedding, embed, linear
from lowrax.models.residual import add_residual, layer_sites, site_adapter
from lowrax.errors import LowraxError


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters, read from an HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    hidden_act: str
    sliding_window: int | None
    max_position_embeddings: int
    rotary_dim: int = 0  # dimensions of each head that rotary embeddings rotate (0: all; Phi-3's partial factor)
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    hf: dict = dc_field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        model_type = hf.get("model_type", "llama")
        hidden = field(hf, "hidden_size")
        heads = field(hf, "num_attention_heads")
        kv_heads = field(hf, "num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise LowraxError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        theta, scaling = rope_settings(hf)
        attention_bias = bool(hf.get("attention_bias", False))
        qwen2 = model_type == "qwen2"
        if qwen2 and hf.get("use_sliding_window"):
            raise LowraxError("Qwen2 with use_sliding_window=true is not supported yet")
        window = hf.get("sliding_window") if model_type in ("mistral", "phi3") else None
        head_dim = field(hf, "head_dim", default=hidden // heads)
        partial = float((hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        return cls(
            model_type=model_type,
            vocab_size=field(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=field(hf, "intermediate_size"),
            num_layers=field(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(field(hf, "rms_norm_eps", default=1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            # Qwen2 always has q/k/v bias and never an output bias.
            qkv_bias=True if qwen2 else attention_bias,
            o_bias=False if qwen2 else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            sliding_window=window,
            max_position_embeddings=field(hf, "max_position_embeddings", default=4096),
            rotary_dim=int(head_dim * partial),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            hf=dict(hf),
        )


def _q_out(c: LlamaConfig) -> int:
    return c.num_heads * c.head_dim


def _kv_out(c: LlamaConfig) -> int:
    return c.num_kv_heads * c.head_dim


_L = "model/layers/{i}"
_K = "model.layers.{i}"

TENSORS = (
    TensorSpec("model/embed_tokens/embedding", "model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size)),
    TensorSpec(f"{_L}/input_layernorm/scale", f"{_K}.input_layernorm.weight", lambda c: (c.hidden_size,)),
    TensorSpec(f"{_L}/self_attn/q_proj/kernel", f"{_K}.self_attn.q_proj.weight", lambda c: (c.hidden_size, _q_out(c)), TRANSPOSE),
    TensorSpec(f"{_L}/self_attn/q_proj/bias", f"{_K}.self_attn.q_proj.bias", lambda c: (_q_out(c),), when=lambda c: c.qkv_bias),
    TensorSpec(f"{_L}/self_attn/k_proj/kernel", f"{_K}.self_attn.k_proj.weight", lambda c: (c.hidden_size, _kv_out(c)), TRANSPOSE),
    TensorSpec(f"{_L}/self_attn/k_proj/bias", f"{_K}.self_attn.k_proj.bias", lambda c: (_kv_out(c),), when=lambda c: c.qkv_bias),
    TensorSpec(f"{_L}/self_attn/v_proj/kernel", f"{_K}.self_attn.v_proj.weight", lambda c: (c.hidden_size, _kv_out(c)), TRANSPOSE),
    TensorSpec(f"{_L}/self_attn/v_proj/bias", f"{_K}.self_attn.v_proj.bias", lambda c: (_kv_out(c),), when=lambda c: c.qkv_bias),
    TensorSpec(f"{_L}/self_attn/o_proj/kernel", f"{_K}.self_attn.o_proj.weight", lambda c: (_q_out(c), c.hidden_size), TRANSPOSE),
    TensorSpec(f"{_L}/self_attn/o_proj/bias", f"{_K}.self_attn.o_proj.bias", lambda c: (c.hidden_size,), when=lambda c: c.o_bias),
    TensorSpec(f"{_L}/post_attention_layernorm/scale", f"{_K}.post_attention_layernorm.weight", lambda c: (c.hidden_size,)),
    TensorSpec(f"{_L}/mlp/gate_proj/kernel", f"{_K}.mlp.gate_proj.weight", lambda c: (c.hidden_size, c.intermediate_size), TRANSPOSE),
    TensorSpec(f"{_L}/mlp/gate_proj/bias", f"{_K}.mlp.gate_proj.bias", lambda c: (c.intermediate_size,), when=lambda c: c.mlp_bias),
    TensorSpec(f"{_L}/mlp/up_proj/kernel", f"{_K}.mlp.up_proj.weight", lambda c: (c.hidden_size, c.intermediate_size), TRANSPOSE),
    TensorSpec(f"{_L}/mlp/up_proj/bias", f"{_K}.mlp.up_proj.bias", lambda c: (c.intermediate_size,), when=lambda c: c.mlp_bias),
    TensorSpec(f"{_L}/mlp/down_proj/kernel", f"{_K}.mlp.down_proj.weight", lambda c: (c.intermediate_size, c.hidden_size), TRANSPOSE),
    TensorSpec(f"{_L}/mlp/down_proj/bias", f"{_K}.mlp.down_proj.bias", lambda c: (c.hidden_size,), when=lambda c: c.mlp_bias),
    TensorSpec("model/norm/scale", "model.norm.weight", lambda c: (c.hidden_size,)),
    TensorSpec("lm_head/kernel", "lm_head.weight", lambda c: (c.hidden_size, c.vocab_size), TRANSPOSE,
               when=lambda c: not c.tie_word_embeddings),
)


@dataclass(frozen=True)
class LlamaModel(CausalLM):
    """A Llama-family causal LM; `apply(params, input_ids, attention_mask)` gives logits."""

    config: LlamaConfig
    remat: bool = False  # see Model.with_remat
    tensor_table = TENSORS
    logical_axes = {"embed_tokens": ("vocab", "embed"), "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"),
                    "v_proj": ("embed", "kv_heads"), "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"),
                    "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed"), "lm_head": ("embed", "vocab")}
    module_roles = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
                    "mlp_in": ("gate_proj", "up_proj"), "mlp_out": ("down_proj",),
                    "norms": ("input_layernorm", "post_attention_layernorm", "norm"),
                    "embedding": ("embed_tokens",)}
    peft_default_exceptions = {"qwen2": {"ia3": ("q_proj", "v_proj", "down_proj"),
                                         "ln_tuning": ("post_attention_layernorm",)}}
    bare_prefix = None

    @property
    def inv_freq(self):
        c = self.config
        return layers.rope_inverse_frequencies(c.rotary_dim or c.head_dim, c.rope_theta, c.rope_scaling)

    def _attention(self, p, x, cos, sin, mask, kv_cache, cache_index):
        c = self.config
        b, t, _ = x.shape
        q = linear(x, p["q_proj"]).reshape(b, t, c.num_heads, c.head_dim)
        k = linear(x, p["k_proj"]).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = linear(x, p["v_proj"]).reshape(b, t, c.num_kv_heads, c.head_dim)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        k, v, new_cache = self.update_cache(kv_cache, k, v, cache_index)
        return linear(self._attend(q, k, v, mask), p["o_proj"]), new_cache

    def _attend(self, q, k, v, mask):
        """Attention over rotated q [b, t, h, d] and k, v [b, s, kv, d]: [b, t, h * d]."""
        return layers.attention(q, k, v, mask, self.config.head_dim**-0.5)

    def _mlp(self, p, x):
        glu = layers.gated_activation(self.config.hidden_act)
        return linear(glu(linear(x, p["gate_proj"]), linear(x, p["up_proj"])), p["down_proj"])

    def _layer(self, p, x, cos, sin, mask, kv, cache_index):
        attn, kv = self._attention(p["self_attn"], self._norm(x, p["input_layernorm"]), cos, sin, mask, kv, cache_index)
        x = add_residual(attn, x, site_adapter(p, "attention_adapters"))
        h = self._mlp(p["mlp"], self._norm(x, p["post_attention_layernorm"]))
        return add_residual(h, x, site_adapter(p, "output_adapters")), kv

    def hidden_states(self, params, input_ids, positions, key_valid, cache=None, cache_index=None, prompt_embeds=None):
        """Final-norm hidden states [b, t, hidden] and the updated KV cache (None without one).
        prompt_embeds [b, v, hidden]: virtual tokens before the input's (then t includes v)."""
        c = self.config
        x = self.with_prompt(self._embed(params, input_ids), prompt_embeds)
        cos, sin = layers.rope_cos_sin(positions, self.inv_freq)
        masks = self._layer_masks(self.query_slots(x, cache_index), key_valid)
        layer = self.layer(self._layer)
        new_cache = [] if cache is not None else None
        for i in range(c.num_layers):
            kv = cache[i] if cache is not None else None
            x, kv = layer(params["model"]["layers"][str(i)], x, cos, sin, masks[i], kv, cache_index)
            if new_cache is not None:
                new_cache.append(kv)
        return self._norm(x, params["model"]["norm"]), new_cache

    # The pieces a Llama-like family may change (Gemma 2 does): the embedding, each layer's
    # attention mask, the RMSNorm.
    def _embed(self, params, input_ids):
        return embed(input_ids, params["model"]["embed_tokens"])

    def _layer_masks(self, query_slots, key_valid) -> list:
        """Each layer's boolean attention mask [b, t, s] (the same one for every Llama layer)."""
        return [layers.causal_mask(query_slots, key_valid, self.config.sliding_window)] * self.config.num_layers

    def _norm(self, x, params):
        return layers.rms_norm(x, params, self.config.rms_norm_eps)

    def bottleneck_sites(self) -> dict[str, tuple[str, int]]:
        """AdapterHub's residual-stream sites (see `models.residual.layer_sites`)."""
        return layer_sites("model.layers.{i}.attention_adapters", "model.layers.{i}.output_adapters", self.config.num_layers)

    def word_embedding_table(self, params):
        return params["model"]["embed_tokens"]["embedding"]

    def logits_from_hidden(self, params, hidden):
        if self.config.tie_word_embeddings:
            return attend_to_embedding(hidden, params["model"]["embed_tokens"])
        return linear(hidden, params["lm_head"])

    def kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, length, self.config.num_kv_heads, self.config.head_dim)

