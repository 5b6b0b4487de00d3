"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused q/k/v projection.

HF stores GPT-2's projections as `Conv1D` weights that are already (in, out),
so unlike Llama they are copied, not transposed, into Flax kernels.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field as dc_field
from typing import Any

from lowrax.core.dropout import dropped_out, layer_key, model_dropout_key, site_key
from lowrax.core.tables import TensorSpec
from lowrax.core import layers
from lowrax.models.base import CausalLM
from lowrax.models.config_utils import field
from lowrax.models.residual import add_residual, layer_sites, site_adapter
from lowrax.core.linear import attend_to_embedding, embed, linear


@dataclass(frozen=True)
class GPT2Config:
    """Architecture hyper-parameters, read from an HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    layer_norm_eps: float
    hidden_act: str
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    embedding_dropout: float = 0.0  # embd_pdrop (training steps only, as the other two)
    attention_dropout: float = 0.0  # attn_pdrop: on the attention probabilities
    residual_dropout: float = 0.0  # resid_pdrop: on each sublayer's output
    hf: dict = dc_field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "GPT2Config":
        hidden = field(hf, "n_embd", "hidden_size")
        return cls(
            model_type=hf.get("model_type", "gpt2"),
            vocab_size=field(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=field(hf, "n_inner", default=4 * hidden),
            num_layers=field(hf, "n_layer", "num_hidden_layers"),
            num_heads=field(hf, "n_head", "num_attention_heads"),
            max_positions=field(hf, "n_positions", "max_position_embeddings"),
            layer_norm_eps=float(field(hf, "layer_norm_epsilon", default=1e-5)),
            hidden_act=field(hf, "activation_function", default="gelu_new"),
            scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            embedding_dropout=float(hf.get("embd_pdrop", 0.1)),  # transformers' defaults where left out
            attention_dropout=float(hf.get("attn_pdrop", 0.1)),
            residual_dropout=float(hf.get("resid_pdrop", 0.1)),
            hf=dict(hf),
        )


_L = "transformer/h/{i}"
_K = "transformer.h.{i}"
_H = lambda c: (c.hidden_size,)  # noqa: E731 - a norm or bias sized like the residual stream

TENSORS = (
    TensorSpec("transformer/wte/embedding", "transformer.wte.weight", lambda c: (c.vocab_size, c.hidden_size)),
    TensorSpec("transformer/wpe/embedding", "transformer.wpe.weight", lambda c: (c.max_positions, c.hidden_size)),
    TensorSpec(f"{_L}/ln_1/scale", f"{_K}.ln_1.weight", _H),
    TensorSpec(f"{_L}/ln_1/bias", f"{_K}.ln_1.bias", _H),
    # Conv1D weights are stored (in, out): copied as they are.
    TensorSpec(f"{_L}/attn/c_attn/kernel", f"{_K}.attn.c_attn.weight", lambda c: (c.hidden_size, 3 * c.hidden_size)),
    TensorSpec(f"{_L}/attn/c_attn/bias", f"{_K}.attn.c_attn.bias", lambda c: (3 * c.hidden_size,)),
    TensorSpec(f"{_L}/attn/c_proj/kernel", f"{_K}.attn.c_proj.weight", lambda c: (c.hidden_size, c.hidden_size)),
    TensorSpec(f"{_L}/attn/c_proj/bias", f"{_K}.attn.c_proj.bias", _H),
    TensorSpec(f"{_L}/ln_2/scale", f"{_K}.ln_2.weight", _H),
    TensorSpec(f"{_L}/ln_2/bias", f"{_K}.ln_2.bias", _H),
    TensorSpec(f"{_L}/mlp/c_fc/kernel", f"{_K}.mlp.c_fc.weight", lambda c: (c.hidden_size, c.intermediate_size)),
    TensorSpec(f"{_L}/mlp/c_fc/bias", f"{_K}.mlp.c_fc.bias", lambda c: (c.intermediate_size,)),
    TensorSpec(f"{_L}/mlp/c_proj/kernel", f"{_K}.mlp.c_proj.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    TensorSpec(f"{_L}/mlp/c_proj/bias", f"{_K}.mlp.c_proj.bias", _H),
    TensorSpec("transformer/ln_f/scale", "transformer.ln_f.weight", _H),
    TensorSpec("transformer/ln_f/bias", "transformer.ln_f.bias", _H),
)


@dataclass(frozen=True)
class GPT2Model(CausalLM):
    """GPT-2 causal LM with the output projection tied to `wte`."""

    config: GPT2Config
    remat: bool = False  # see Model.with_remat
    tensor_table = TENSORS
    logical_axes = {"wte": ("vocab", "embed"), "wpe": ("positions", "embed"), "c_attn": ("embed", "heads"),
                    "attn/c_proj": ("heads", "embed"), "c_fc": ("embed", "mlp"), "mlp/c_proj": ("mlp", "embed")}
    # PEFT adapts the MLP output, not c_attn, by default for these two
    peft_default_exceptions = {"gpt2": {"fourierft": ("mlp.c_proj",), "c3a": ("mlp.c_proj",), "osf": ("c_attn", "c_proj")}}
    module_roles = {"q": ("c_attn",), "k": ("c_attn",), "v": ("c_attn",), "o": ("attn.c_proj",),
                    "mlp_in": ("c_fc",), "mlp_out": ("mlp.c_proj",), "norms": ("ln_1", "ln_2", "ln_f"),
                    "embedding": ("wte",)}
    bare_prefix = "transformer."

    def _attention(self, i, p, x, mask, kv_cache, cache_index, drop=None):
        c = self.config
        b, t, _ = x.shape
        q, k, v = (part.reshape(b, t, c.num_heads, c.head_dim) for part in
                   linear(x, p["c_attn"]).reshape(b, t, 3, c.hidden_size).transpose(2, 0, 1, 3))
        k, v, new_cache = self.update_cache(kv_cache, k, v, cache_index)
        scale = c.head_dim**-0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= i + 1
        attn = layers.attention(q, k, v, mask, scale, dropout=(c.attention_dropout, site_key(drop, 0)))
        return dropped_out(linear(attn, p["c_proj"]), c.residual_dropout, drop, 1), new_cache

    def _layer(self, i, p, x, mask, kv, cache_index, drop=None):
        c = self.config
        attn, kv = self._attention(i, p["attn"], layers.layer_norm(x, p["ln_1"], c.layer_norm_eps), mask, kv, cache_index,
                                   drop)
        x = add_residual(attn, x, site_adapter(p, "attention_adapters"))
        h = layers.layer_norm(x, p["ln_2"], c.layer_norm_eps)
        h = linear(layers.activation(c.hidden_act)(linear(h, p["mlp"]["c_fc"])), p["mlp"]["c_proj"])
        h = dropped_out(h, c.residual_dropout, drop, 2)
        return add_residual(h, x, site_adapter(p, "output_adapters")), kv

    def bottleneck_sites(self) -> dict[str, tuple[str, int]]:
        """AdapterHub's residual-stream sites (see `models.residual.layer_sites`)."""
        return layer_sites("transformer.h.{i}.attention_adapters", "transformer.h.{i}.output_adapters", self.config.num_layers)

    def hidden_states(self, params, input_ids, positions, key_valid, cache=None, cache_index=None, prompt_embeds=None):
        """Final-LayerNorm hidden states [b, t, hidden] and the updated KV cache.
        prompt_embeds [b, v, hidden]: virtual tokens before the input's (then t includes v)."""
        c = self.config
        drop = model_dropout_key(params)
        tp = params["transformer"]
        x = self.with_prompt(embed(input_ids, tp["wte"]), prompt_embeds) + embed(positions, tp["wpe"])
        x = dropped_out(x, c.embedding_dropout, drop, 0)
        mask = layers.causal_mask(self.query_slots(x, cache_index), key_valid)
        new_cache = [] if cache is not None else None
        for i in range(c.num_layers):
            kv = cache[i] if cache is not None else None
            x, kv = self.layer(functools.partial(self._layer, i))(tp["h"][str(i)], x, mask, kv, cache_index,
                                                                   layer_key(drop, i))
            if new_cache is not None:
                new_cache.append(kv)
        return layers.layer_norm(x, tp["ln_f"], c.layer_norm_eps), new_cache

    def word_embedding_table(self, params):
        return params["transformer"]["wte"]["embedding"]

    def logits_from_hidden(self, params, hidden):
        return attend_to_embedding(hidden, params["transformer"]["wte"])

    def kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, length, self.config.num_heads, self.config.head_dim)
