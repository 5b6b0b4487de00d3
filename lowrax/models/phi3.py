"""Phi-3: a Llama-family decoder with fused projections.

The attention's query, key and value come from one `qkv_proj` ([q | k | v] along its output)
and the MLP's gate and up from one `gate_up_proj` ([gate | up]); rotary embeddings may cover
only part of each head (`partial_rotary_factor`), and a sliding window may bound attention.
The fused kernels stay fused in the tree, as transformers and PEFT hold them, so a LoRA on
`qkv_proj` is one adapter over the fused weight, stored exactly as PEFT stores it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrax.core.tables import TRANSPOSE, TensorSpec
from lowrax.core import layers
from lowrax.core.linear import linear
from lowrax.models.llama import LlamaConfig, LlamaModel

_L = "model/layers/{i}"
_K = "model.layers.{i}"


def _qkv_out(c: LlamaConfig) -> int:
    return (c.num_heads + 2 * c.num_kv_heads) * c.head_dim


TENSORS = (
    TensorSpec("model/embed_tokens/embedding", "model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size)),
    TensorSpec(f"{_L}/input_layernorm/scale", f"{_K}.input_layernorm.weight", lambda c: (c.hidden_size,)),
    TensorSpec(f"{_L}/self_attn/qkv_proj/kernel", f"{_K}.self_attn.qkv_proj.weight",
               lambda c: (c.hidden_size, _qkv_out(c)), TRANSPOSE),
    TensorSpec(f"{_L}/self_attn/o_proj/kernel", f"{_K}.self_attn.o_proj.weight",
               lambda c: (c.num_heads * c.head_dim, c.hidden_size), TRANSPOSE),
    TensorSpec(f"{_L}/post_attention_layernorm/scale", f"{_K}.post_attention_layernorm.weight", lambda c: (c.hidden_size,)),
    TensorSpec(f"{_L}/mlp/gate_up_proj/kernel", f"{_K}.mlp.gate_up_proj.weight",
               lambda c: (c.hidden_size, 2 * c.intermediate_size), TRANSPOSE),
    TensorSpec(f"{_L}/mlp/down_proj/kernel", f"{_K}.mlp.down_proj.weight", lambda c: (c.intermediate_size, c.hidden_size),
               TRANSPOSE),
    TensorSpec("model/norm/scale", "model.norm.weight", lambda c: (c.hidden_size,)),
    TensorSpec("lm_head/kernel", "lm_head.weight", lambda c: (c.hidden_size, c.vocab_size), TRANSPOSE,
               when=lambda c: not c.tie_word_embeddings),
)


@dataclass(frozen=True)
class Phi3Model(LlamaModel):
    """A Phi-3 causal LM: the Llama forward with the fused projections split after the product."""

    tensor_table = TENSORS
    logical_axes = {"embed_tokens": ("vocab", "embed"), "qkv_proj": ("embed", "heads"), "o_proj": ("heads", "embed"),
                    "gate_up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed"), "lm_head": ("embed", "vocab")}
    module_roles = {"q": ("qkv_proj",), "k": ("qkv_proj",), "v": ("qkv_proj",), "o": ("o_proj",),
                    "mlp_in": ("gate_up_proj",), "mlp_out": ("down_proj",),
                    "norms": ("input_layernorm", "post_attention_layernorm", "norm"),
                    "embedding": ("embed_tokens",)}
    peft_default_exceptions = {}

    def _attention(self, p, x, cos, sin, mask, kv_cache, cache_index):
        c = self.config
        b, t, _ = x.shape
        qkv = linear(x, p["qkv_proj"])
        q_end, k_end = c.num_heads * c.head_dim, (c.num_heads + c.num_kv_heads) * c.head_dim
        q = qkv[..., :q_end].reshape(b, t, c.num_heads, c.head_dim)
        k = qkv[..., q_end:k_end].reshape(b, t, c.num_kv_heads, c.head_dim)
        v = qkv[..., k_end:].reshape(b, t, c.num_kv_heads, c.head_dim)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        k, v, new_cache = self.update_cache(kv_cache, k, v, cache_index)
        return linear(self._attend(q, k, v, mask), p["o_proj"]), new_cache

    def _mlp(self, p, x):
        gate_up = linear(x, p["gate_up_proj"])
        gate, up = gate_up[..., : self.config.intermediate_size], gate_up[..., self.config.intermediate_size:]
        return linear(layers.gated_activation(self.config.hidden_act)(gate, up), p["down_proj"])
