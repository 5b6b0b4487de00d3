"""BERT-style encoders: BERT, MiniLM (a BERT) and RoBERTa.

Post-LayerNorm blocks with bidirectional attention; outputs the last hidden
states, the pooled [CLS] vector (when the checkpoint has a pooler) and, for
sequence-classification checkpoints, the classifier logits. The tree is
rooted at `bert`/`roberta` as in HF's task models, so a bare `BertModel`
checkpoint (keys without the prefix) and a `BertForSequenceClassification`
one load into the same structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import NamedTuple

import jax.numpy as jnp

from lowrax.core.tables import TRANSPOSE, TensorSpec
from lowrax.core import layers
from lowrax.models.base import Model, rows_for_adapters
from lowrax.models.config_utils import field, head_labels
from lowrax.core.dropout import dropped_out, layer_key, model_dropout_key, site_key
from lowrax.core.node import resolve, virtual_tokens
from lowrax.core.linear import embed, linear
from lowrax.models.residual import add_residual, layer_sites, site_adapter
from lowrax.errors import LowraxError


class EncoderOutput(NamedTuple):
    """last_hidden_state [b, t, hidden]; pooler_output [b, hidden] or None; logits [b, labels] or None."""

    last_hidden_state: jnp.ndarray
    pooler_output: jnp.ndarray | None
    logits: jnp.ndarray | None


@dataclass(frozen=True)
class BertConfig:
    """Architecture hyper-parameters, read from an HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    num_labels: int | None
    hidden_dropout: float = 0.0  # hidden_dropout_prob: embeddings, each sublayer's output (training steps only)
    attention_dropout: float = 0.0  # attention_probs_dropout_prob
    classifier_dropout: float = 0.0  # classifier_dropout, else hidden_dropout_prob: before the head
    hf: dict = dc_field(default_factory=dict, compare=False, repr=False)

    @property
    def root(self) -> str:
        """Name of the encoder's subtree and key prefix: `bert` or `roberta`."""
        return "roberta" if self.model_type in ("roberta", "xlm-roberta") else "bert"

    @classmethod
    def from_hf(cls, hf: dict, num_labels: int | None = None) -> "BertConfig":
        num_labels = head_labels(hf, num_labels, "ForSequenceClassification")
        return cls(
            model_type=hf.get("model_type", "bert"),
            vocab_size=field(hf, "vocab_size"),
            hidden_size=field(hf, "hidden_size"),
            intermediate_size=field(hf, "intermediate_size"),
            num_layers=field(hf, "num_hidden_layers"),
            num_heads=field(hf, "num_attention_heads"),
            max_positions=field(hf, "max_position_embeddings"),
            type_vocab_size=field(hf, "type_vocab_size", default=2),
            layer_norm_eps=float(field(hf, "layer_norm_eps", default=1e-12)),
            hidden_act=field(hf, "hidden_act", default="gelu"),
            pad_token_id=int(field(hf, "pad_token_id", default=0)),
            num_labels=num_labels,
            # transformers' defaults (0.1) where config.json leaves a rate out
            hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
            classifier_dropout=float(hf["classifier_dropout"] if hf.get("classifier_dropout") is not None
                                     else hf.get("hidden_dropout_prob", 0.1)),
            hf=dict(hf),
        )


def _tensors(root: str, roberta_head: bool) -> tuple[TensorSpec, ...]:
    H = lambda c: (c.hidden_size,)  # noqa: E731
    HH = lambda c: (c.hidden_size, c.hidden_size)  # noqa: E731
    E, L, K = f"{root}/embeddings", f"{root}/encoder/layer/{{i}}", f"{root}.encoder.layer.{{i}}"

    def dense(path, key, shape, bias_shape, **kw):
        return (TensorSpec(f"{path}/kernel", f"{key}.weight", shape, TRANSPOSE, **kw),
                TensorSpec(f"{path}/bias", f"{key}.bias", bias_shape, **kw))

    def norm(path, key):
        return (TensorSpec(f"{path}/scale", f"{key}.weight", H), TensorSpec(f"{path}/bias", f"{key}.bias", H))

    has_head = lambda c: c.num_labels is not None  # noqa: E731
    labels = lambda c: (c.num_labels,)  # noqa: E731
    head = (
        dense("classifier/dense", "classifier.dense", HH, H, when=has_head)
        + dense("classifier/out_proj", "classifier.out_proj", lambda c: (c.hidden_size, c.num_labels), labels, when=has_head)
        if roberta_head else
        dense("classifier", "classifier", lambda c: (c.hidden_size, c.num_labels), labels, when=has_head)
    )
    return (
        TensorSpec(f"{E}/word_embeddings/embedding", f"{root}.embeddings.word_embeddings.weight", lambda c: (c.vocab_size, c.hidden_size)),
        TensorSpec(f"{E}/position_embeddings/embedding", f"{root}.embeddings.position_embeddings.weight", lambda c: (c.max_positions, c.hidden_size)),
        TensorSpec(f"{E}/token_type_embeddings/embedding", f"{root}.embeddings.token_type_embeddings.weight", lambda c: (c.type_vocab_size, c.hidden_size)),
        *norm(f"{E}/LayerNorm", f"{root}.embeddings.LayerNorm"),
        *dense(f"{L}/attention/self/query", f"{K}.attention.self.query", HH, H),
        *dense(f"{L}/attention/self/key", f"{K}.attention.self.key", HH, H),
        *dense(f"{L}/attention/self/value", f"{K}.attention.self.value", HH, H),
        *dense(f"{L}/attention/output/dense", f"{K}.attention.output.dense", HH, H),
        *norm(f"{L}/attention/output/LayerNorm", f"{K}.attention.output.LayerNorm"),
        *dense(f"{L}/intermediate/dense", f"{K}.intermediate.dense", lambda c: (c.hidden_size, c.intermediate_size), lambda c: (c.intermediate_size,)),
        *dense(f"{L}/output/dense", f"{K}.output.dense", lambda c: (c.intermediate_size, c.hidden_size), H),
        *norm(f"{L}/output/LayerNorm", f"{K}.output.LayerNorm"),
        # Task checkpoints of RoBERTa drop the pooler; load it whenever it is there.
        *dense(f"{root}/pooler/dense", f"{root}.pooler.dense", HH, H, optional=True),
        *head,
    )


@dataclass(frozen=True)
class BertModel(Model):
    """A BERT-style encoder; `apply` returns an `EncoderOutput`."""

    config: BertConfig
    remat: bool = False  # see Model.with_remat
    classifies = True
    logical_axes = {"word_embeddings": ("vocab", "embed"), "position_embeddings": ("positions", "embed"),
                    "token_type_embeddings": (None, "embed"), "query": ("embed", "heads"), "key": ("embed", "heads"),
                    "value": ("embed", "heads"), "attention/output/dense": ("heads", "embed"),
                    "intermediate/dense": ("embed", "mlp"), "output/dense": ("mlp", "embed"),
                    "pooler/dense": ("embed", None), "classifier": ("embed", "classes"),
                    "classifier/dense": ("embed", None), "classifier/out_proj": ("embed", "classes")}
    # "output.dense" also names the attention's output projection (PEFT's IA3 default adapts both)
    module_roles = {"q": ("query",), "k": ("key",), "v": ("value",), "o": ("attention.output.dense",),
                    "mlp_in": ("intermediate.dense",), "mlp_out": ("output.dense",), "norms": ("LayerNorm",),
                    "embedding": ("word_embeddings",)}
    peft_default_exceptions = {"roberta": {"adalora": ("query", "key", "value", "dense")}}

    @property
    def tensor_table(self):
        return _tensors(self.config.root, roberta_head=self.config.root == "roberta")

    @property
    def bare_prefix(self):
        return self.config.root + "."

    def _positions(self, attention_mask):
        c = self.config
        t = attention_mask.shape[1]
        if c.root == "roberta":
            # RoBERTa counts positions from padding_idx + 1 and gives padding padding_idx.
            mask = attention_mask.astype(jnp.int32)
            return jnp.cumsum(mask, axis=1) * mask + c.pad_token_id
        return jnp.broadcast_to(jnp.arange(t)[None, :], attention_mask.shape)

    def _layer(self, p, x, mask, drop=None):
        c = self.config
        b, t, _ = x.shape
        head_dim = c.hidden_size // c.num_heads
        a = p["attention"]
        q, k, v = (linear(x, a["self"][n]).reshape(b, t, c.num_heads, head_dim) for n in ("query", "key", "value"))
        attn = layers.attention(q, k, v, mask, head_dim**-0.5, dropout=(c.attention_dropout, site_key(drop, 0)))
        attn = dropped_out(linear(attn, a["output"]["dense"]), c.hidden_dropout, drop, 1)
        x = add_residual(attn, x, site_adapter(a, "output"),
                         lambda y: layers.layer_norm(y, a["output"]["LayerNorm"], c.layer_norm_eps))
        h = linear(layers.activation(c.hidden_act)(linear(x, p["intermediate"]["dense"])), p["output"]["dense"])
        h = dropped_out(h, c.hidden_dropout, drop, 2)
        return add_residual(h, x, site_adapter(p, "output"),
                            lambda y: layers.layer_norm(y, p["output"]["LayerNorm"], c.layer_norm_eps))

    def bottleneck_sites(self) -> dict[str, tuple[str, int]]:
        """AdapterHub's residual-stream sites, its `BertSelfOutput` and `BertOutput` modules (see
        `models.residual.layer_sites`)."""
        root = self.config.root
        return layer_sites(f"{root}.encoder.layer.{{i}}.attention.output", f"{root}.encoder.layer.{{i}}.output",
                           self.config.num_layers)

    def apply(self, params, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
              adapter_names=None) -> EncoderOutput:
        """Encode input_ids [b, t]; attention_mask [b, t] is 1 for tokens, 0 for padding.
        adapter_names: with named adapters, one name per row ("__base__": none)."""
        c = self.config
        drop = model_dropout_key(params)
        params = resolve(rows_for_adapters(params, adapter_names, input_ids.shape[0]))
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        given_positions = position_ids
        if position_ids is None:
            position_ids = self._positions(attention_mask)
        root = params[c.root]
        e = root["embeddings"]
        words = embed(input_ids, e["word_embeddings"])
        b, t = input_ids.shape
        prompt = virtual_tokens(params)
        v = 0
        if prompt is not None:
            # PEFT's sequence classification with prompt tuning or P-tuning: v embeddings (token
            # type 0) before the input, at positions 0..v-1; the pooler reads the first of them.
            self._check_virtual_tokens(prompt, given_positions)
            v, table = prompt.num_virtual_tokens, prompt.prompt_embeddings()
            attention_mask = jnp.concatenate([jnp.ones((b, v), attention_mask.dtype), attention_mask], axis=1)
            words = jnp.concatenate([jnp.broadcast_to(table[None].astype(words.dtype), (b,) + table.shape), words], 1)
            token_type_ids = jnp.concatenate([jnp.zeros((b, v), token_type_ids.dtype), token_type_ids], axis=1)
            position_ids = jnp.broadcast_to(jnp.arange(v + t)[None, :], (b, v + t))
        x = words + embed(token_type_ids, e["token_type_embeddings"])
        x = layers.layer_norm(x + embed(position_ids, e["position_embeddings"]), e["LayerNorm"], c.layer_norm_eps)
        x = dropped_out(x, c.hidden_dropout, drop, 0)
        mask = jnp.broadcast_to(attention_mask.astype(bool)[:, None, :], (b, v + t, v + t))
        layer = self.layer(self._layer)
        for i in range(c.num_layers):
            x = layer(root["encoder"]["layer"][str(i)], x, mask, layer_key(drop, i))
        pooled = jnp.tanh(linear(x[:, 0], root["pooler"]["dense"])) if "pooler" in root else None
        return EncoderOutput(x[:, v:], pooled, self._classify(params, x, pooled, site_key(drop, 1)))

    def classifier_architecture(self) -> str:
        return "RobertaForSequenceClassification" if self.config.root == "roberta" else "BertForSequenceClassification"

    def _check_virtual_tokens(self, prompt, position_ids) -> None:
        if self.config.root != "bert":
            raise LowraxError(f"prompt-learning adapters on encoders are implemented for BERT; {self.config.root} "
                              "numbers positions from its padding index, which PEFT's virtual-token path does not")
        if prompt.peft_type == "PREFIX_TUNING":  # refused when wrapped or loaded too: PEFT has no working reference
            raise LowraxError("prefix tuning on BERT-family encoders is not supported (PEFT cannot run it on transformers 5)")
        if position_ids is not None:
            raise LowraxError(f"position_ids cannot be given with {prompt.peft_type}'s virtual tokens (PEFT ignores them "
                              "too): the virtual tokens take positions 0..v-1")

    def word_embedding_table(self, params):
        return params[self.config.root]["embeddings"]["word_embeddings"]["embedding"]

    def _classify(self, params, hidden, pooled, drop=None):
        if "classifier" not in params:
            return None
        head, rate = params["classifier"], self.config.classifier_dropout
        if self.config.root == "roberta":  # RobertaClassificationHead: dropout before each of its two layers
            first = linear(dropped_out(hidden[:, 0], rate, drop, 0), head["dense"])
            return linear(dropped_out(jnp.tanh(first), rate, drop, 1), head["out_proj"])
        if pooled is None:
            raise LowraxError("a BERT classifier needs the pooler (bert/pooler/dense), which these params lack")
        return linear(dropped_out(pooled, rate, drop, 0), head)
