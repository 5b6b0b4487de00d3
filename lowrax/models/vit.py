"""Vision Transformers (`model_type` vit; DeiT checkpoints saved as ViT load too).

Non-overlapping patches projected by the patch "convolution" (one matmul over
flattened patches), a [CLS] token and learned positions, pre-LayerNorm blocks
with bidirectional attention, a final LayerNorm; `ViTForImageClassification`
reads its `classifier` from the [CLS] vector.

Module names: the tree follows transformers 5's modules (`vit/layers/0/attention/q_proj`),
which PEFT adapters made on transformers 5 name; checkpoint files keep transformers 4's keys
(`vit.encoder.layer.0.attention.attention.query`), which transformers 5's own `save_pretrained`
still writes so that either version reads them. Files and adapters under the other naming
load too (`checkpoint_key`, `adapter_key`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field as dc_field
from typing import ClassVar

import jax.numpy as jnp

from lowrax.core.dropout import dropped_out, layer_key, model_dropout_key, site_key
from lowrax.core.node import resolve, virtual_tokens
from lowrax.errors import LowraxError
from lowrax.core.tables import TRANSPOSE, TensorSpec
from lowrax.core import layers
from lowrax.models.base import Model, rows_for_adapters
from lowrax.models.bert import EncoderOutput
from lowrax.models.config_utils import field, head_labels
from lowrax.core.linear import linear


@dataclass(frozen=True)
class ViTConfig:
    """Architecture hyper-parameters, read from an HF `config.json`."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    image_size: int
    patch_size: int
    num_channels: int
    qkv_bias: bool
    num_labels: int | None
    hidden_dropout: float = 0.0  # hidden_dropout_prob: embeddings, each sublayer's output (training steps only)
    attention_dropout: float = 0.0  # attention_probs_dropout_prob
    hf: dict = dc_field(default_factory=dict, compare=False, repr=False)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: dict, num_labels: int | None = None) -> "ViTConfig":
        num_labels = head_labels(hf, num_labels, "ForImageClassification")
        image_size, patch_size = hf.get("image_size", 224), hf.get("patch_size", 16)
        if not isinstance(image_size, int) or not isinstance(patch_size, int) or image_size % patch_size:
            raise LowraxError(f"ViT needs a square integer image_size divisible by patch_size; got image_size "
                              f"{image_size!r}, patch_size {patch_size!r}")
        act = hf.get("hidden_act", "gelu")
        layers.activation(act)
        return cls(
            model_type="vit",
            hidden_size=field(hf, "hidden_size"),
            intermediate_size=field(hf, "intermediate_size"),
            num_layers=field(hf, "num_hidden_layers"),
            num_heads=field(hf, "num_attention_heads"),
            hidden_act=act,
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            image_size=image_size,
            patch_size=patch_size,
            num_channels=int(hf.get("num_channels", 3)),
            qkv_bias=bool(hf.get("qkv_bias", True)),
            num_labels=num_labels,
            hidden_dropout=float(hf.get("hidden_dropout_prob", 0.0)),  # transformers' ViT defaults: 0
            attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.0)),
            hf=dict(hf),
        )


def _tensors() -> tuple[TensorSpec, ...]:
    H = lambda c: (c.hidden_size,)  # noqa: E731
    HH = lambda c: (c.hidden_size, c.hidden_size)  # noqa: E731
    L, K = "vit/layers/{i}", "vit.encoder.layer.{i}"

    def dense(path, key, shape, bias_shape, has_bias=None, when=None, optional=False):
        bias_when = when if has_bias is None else has_bias
        return (TensorSpec(f"{path}/kernel", f"{key}.weight", shape, TRANSPOSE, when=when, optional=optional),
                TensorSpec(f"{path}/bias", f"{key}.bias", bias_shape, when=bias_when, optional=optional))

    def norm(path, key):
        return (TensorSpec(f"{path}/scale", f"{key}.weight", H), TensorSpec(f"{path}/bias", f"{key}.bias", H))

    qkv_bias = lambda c: c.qkv_bias  # noqa: E731
    has_head = lambda c: c.num_labels is not None  # noqa: E731
    return (
        TensorSpec("vit/embeddings/cls_token", "vit.embeddings.cls_token", lambda c: (1, 1, c.hidden_size)),
        TensorSpec("vit/embeddings/position_embeddings", "vit.embeddings.position_embeddings",
                   lambda c: (1, c.num_patches + 1, c.hidden_size)),
        # The patch convolution keeps torch's (out, channels, p, p) layout: it is no linear layer to adapters
        # (PEFT's image guide targets query/value), and the forward reads it as one matmul over patches.
        TensorSpec("vit/embeddings/patch_embeddings/projection/weight", "vit.embeddings.patch_embeddings.projection.weight",
                   lambda c: (c.hidden_size, c.num_channels, c.patch_size, c.patch_size)),
        TensorSpec("vit/embeddings/patch_embeddings/projection/bias", "vit.embeddings.patch_embeddings.projection.bias", H),
        *norm(f"{L}/layernorm_before", f"{K}.layernorm_before"),
        *dense(f"{L}/attention/q_proj", f"{K}.attention.attention.query", HH, H, qkv_bias),
        *dense(f"{L}/attention/k_proj", f"{K}.attention.attention.key", HH, H, qkv_bias),
        *dense(f"{L}/attention/v_proj", f"{K}.attention.attention.value", HH, H, qkv_bias),
        *dense(f"{L}/attention/o_proj", f"{K}.attention.output.dense", HH, H),
        *norm(f"{L}/layernorm_after", f"{K}.layernorm_after"),
        *dense(f"{L}/mlp/fc1", f"{K}.intermediate.dense", lambda c: (c.hidden_size, c.intermediate_size),
               lambda c: (c.intermediate_size,)),
        *dense(f"{L}/mlp/fc2", f"{K}.output.dense", lambda c: (c.intermediate_size, c.hidden_size), H),
        *norm("vit/layernorm", "vit.layernorm"),
        *dense("vit/pooler/dense", "vit.pooler.dense", HH, H, optional=True),  # ViTModel's, when it has one
        *dense("classifier", "classifier", lambda c: (c.hidden_size, c.num_labels), lambda c: (c.num_labels,),
               when=has_head),
    )


# transformers 4 -> 5 module names, applied in order to a key (as transformers' own ViT conversion).
_V4_TO_V5 = ((re.compile(r"\bencoder\.layer\."), "layers."), (re.compile(r"attention\.attention\.query\b"), "attention.q_proj"),
             (re.compile(r"attention\.attention\.key\b"), "attention.k_proj"),
             (re.compile(r"attention\.attention\.value\b"), "attention.v_proj"),
             (re.compile(r"attention\.output\.dense\b"), "attention.o_proj"),
             (re.compile(r"intermediate\.dense\b"), "mlp.fc1"), (re.compile(r"\boutput\.dense\b"), "mlp.fc2"))
# and back: what a checkpoint file keys (the tensor table's names)
_V5_TO_V4 = ((re.compile(r"(^|\.)layers\.(\d+)\."), r"\1encoder.layer.\2."),
             (re.compile(r"attention\.([qkv])_proj\b"), lambda m: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[m[1]]),
             (re.compile(r"attention\.o_proj\b"), "attention.output.dense"),
             (re.compile(r"mlp\.fc1\b"), "intermediate.dense"), (re.compile(r"mlp\.fc2\b"), "output.dense"))
# PEFT target_modules entries written against transformers 4's ViT.
_V4_MODULE_NAMES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "attention.output.dense": "o_proj",
                    "intermediate.dense": "fc1", "output.dense": "fc2"}


def _renamed(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = pattern.sub(replacement, key)
    return key


@dataclass(frozen=True)
class ViTModel(Model):
    """A ViT image encoder (and classifier); `apply(params, pixel_values)` returns an `EncoderOutput`."""

    config: ViTConfig
    remat: bool = False  # see Model.with_remat
    tensor_table = _tensors()
    bare_prefix = "vit."
    is_image_model: ClassVar[bool] = True
    classifies = True
    logical_axes = {"q_proj": ("embed", "heads"), "k_proj": ("embed", "heads"), "v_proj": ("embed", "heads"),
                    "o_proj": ("heads", "embed"), "fc1": ("embed", "mlp"), "fc2": ("mlp", "embed"),
                    "pooler/dense": ("embed", None), "classifier": ("embed", "classes")}
    module_roles = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",), "mlp_in": ("fc1",),
                    "mlp_out": ("fc2",), "norms": ("layernorm_before", "layernorm_after", "layernorm")}

    @staticmethod
    def checkpoint_key(key: str) -> str:
        """A checkpoint key in the table's (transformers 4) names, whichever transformers wrote it."""
        return _renamed(key, _V5_TO_V4)

    @staticmethod
    def adapter_key(key: str) -> str:
        """A PEFT adapter key in the tree's (transformers 5) module names."""
        return _renamed(key, _V4_TO_V5)

    @staticmethod
    def adapter_module_name(name: str) -> str:
        """A PEFT target_modules entry in transformers 5's names ("query" -> "q_proj")."""
        return _V4_MODULE_NAMES.get(name, _renamed(name, _V4_TO_V5))

    def classifier_architecture(self) -> str:
        return "ViTForImageClassification"

    def _embed(self, e, pixel_values):
        c = self.config
        b, channels, height, width = pixel_values.shape
        if channels != c.num_channels or height != c.image_size or width != c.image_size:
            raise LowraxError(f"pixel_values must be [batch, {c.num_channels}, {c.image_size}, {c.image_size}] "
                              f"(the model's num_channels and image_size; see lowrax.ImageProcessor), got "
                              f"{list(pixel_values.shape)}")
        p, g = c.patch_size, c.image_size // c.patch_size
        patches = pixel_values.reshape(b, channels, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
        proj = e["patch_embeddings"]["projection"]
        weight = proj["weight"].reshape(c.hidden_size, -1).astype(patches.dtype)
        x = jnp.einsum("bnk,hk->bnh", patches, weight) + proj["bias"].astype(patches.dtype)
        cls = jnp.broadcast_to(e["cls_token"].astype(x.dtype), (b, 1, c.hidden_size))
        return jnp.concatenate([cls, x], axis=1) + e["position_embeddings"].astype(x.dtype)

    def _layer(self, p, x, drop=None):
        c = self.config
        b, t, _ = x.shape
        head_dim = c.hidden_size // c.num_heads
        a = p["attention"]
        h = layers.layer_norm(x, p["layernorm_before"], c.layer_norm_eps)
        q, k, v = (linear(h, a[n]).reshape(b, t, c.num_heads, head_dim) for n in ("q_proj", "k_proj", "v_proj"))
        mask = jnp.ones((b, t, t), bool)
        attn = layers.attention(q, k, v, mask, head_dim**-0.5, dropout=(c.attention_dropout, site_key(drop, 0)))
        x = x + dropped_out(linear(attn, a["o_proj"]), c.hidden_dropout, drop, 1)
        h = layers.layer_norm(x, p["layernorm_after"], c.layer_norm_eps)
        h = linear(layers.activation(c.hidden_act)(linear(h, p["mlp"]["fc1"])), p["mlp"]["fc2"])
        return x + dropped_out(h, c.hidden_dropout, drop, 2)

    def apply(self, params, pixel_values, adapter_names=None) -> EncoderOutput:
        """Encode pixel_values [b, channels, height, width] as the image processor makes them."""
        drop = model_dropout_key(params)
        params = resolve(rows_for_adapters(params, adapter_names, pixel_values.shape[0]))
        prompt = virtual_tokens(params)
        if prompt is not None:
            raise LowraxError(f"{prompt.peft_type} on ViT is not supported: lowrax places virtual tokens for "
                              "decoder-only LMs and BERT encoders")
        vit = params["vit"]
        dtype = self.activation_dtype(params)
        x = dropped_out(self._embed(vit["embeddings"], jnp.asarray(pixel_values).astype(dtype)),
                        self.config.hidden_dropout, drop, 0)
        layer = self.layer(self._layer)
        for i in range(self.config.num_layers):
            x = layer(vit["layers"][str(i)], x, layer_key(drop, i))
        x = layers.layer_norm(x, vit["layernorm"], self.config.layer_norm_eps)
        pooled = jnp.tanh(linear(x[:, 0], vit["pooler"]["dense"])) if "pooler" in vit else None
        logits = linear(x[:, 0], params["classifier"]) if "classifier" in params else None
        return EncoderOutput(x, pooled, logits)
