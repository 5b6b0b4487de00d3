"""What every model family shares: the causal-LM forward contract and KV caching.

A family subclasses `CausalLM` (decoders) and provides `hidden_states`,
`logits_from_hidden` and `kv_shape`; this class turns them into
`apply(params, input_ids, attention_mask)` for training and evaluation and
into `prefill`/`decode_step` for generation with a fixed-size KV cache.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from lowrax.errors import LowraxError
from lowrax.core import tables
from lowrax.core.dropout import model_dropout_key
from lowrax.core.layers import positions_from_mask, segment_positions, segment_visibility
from lowrax.core.slot_directory import has_named_adapters, with_adapter_rows
from lowrax.core.node import resolve, virtual_tokens


# Set by layer-wise calibration (`lowrax.pruning.calibrate`): a function given each layer's
# `layer_fn` that returns what the forward calls in its place, to see or replace every layer.
LAYER_HOOK: contextvars.ContextVar = contextvars.ContextVar("lowrax_layer_hook", default=None)


def rows_for_adapters(params, adapter_names, batch: int):
    """params running each row with its named adapter (`adapter_names`, one per row); as they are for None."""
    if adapter_names is None:
        return params
    if not has_named_adapters(params):
        raise LowraxError("adapter_names needs named adapters: load them with "
                          "lowrax.load_peft(params, adapter_dir, model, adapter_name='a')")
    return with_adapter_rows(params, adapter_names, batch)


def recomputed_in_backward(layer_fn: Callable) -> Callable:
    """`layer_fn(params, x, *rest)` whose backward pass recomputes its forward from the inputs.

    Only the inputs are kept for the backward pass (one [b, t, hidden] array per layer
    besides the weights). `jax.checkpoint` marks its recomputation with optimization
    barriers, but XLA's CPU pipeline removes those before scheduling and then runs the
    recomputation during the forward pass, keeping every activation alive anyway
    (measured on SmolLM2: 1.33 -> 1.23 GB of step temporaries). Here the recomputation
    takes the incoming gradient as a zero-valued input, so no backend can start it
    before the backward pass reaches the layer.
    """

    @jax.custom_vjp
    def layer(params, x, *rest):
        return layer_fn(params, x, *rest)

    def forward(params, x, *rest):
        return layer_fn(params, x, *rest), (params, x, rest)

    def backward(saved, grads):
        params, x, rest = saved
        anchor = next(g for g in jax.tree.leaves(grads) if jnp.issubdtype(g.dtype, jnp.floating))
        x = x + (anchor.reshape(-1)[0] * 0).astype(x.dtype)  # x * 0 is not folded away for floats
        _, vjp = jax.vjp(layer_fn, params, x, *rest)
        return vjp(grads)

    layer.defvjp(forward, backward)
    return layer


class Model:
    """Common to all families: the tensor table and the config.

    Families are frozen dataclasses with a `config` and a `remat` flag (set through
    `with_remat` for a training step).
    """

    config: Any
    tensor_table: ClassVar[tuple]
    # Prefix of the task-model keys that a bare base-model checkpoint omits
    # (e.g. "bert." for BertModel saved without a head); None when keys never omit one.
    bare_prefix: ClassVar[str | None] = None
    is_causal_lm: ClassVar[bool] = False
    is_seq2seq: ClassVar[bool] = False  # an encoder-decoder (T5): apply takes decoder_input_ids
    classifies: ClassVar[bool] = False  # an encoder with (or able to take) a `classifier` head: BERT, ViT
    is_image_model: ClassVar[bool] = False  # apply takes pixel_values (ViT)
    # Module path suffix -> logical axis names of its kernel (bias: the last one); see lowrax.dist.sharding.
    logical_axes: ClassVar[dict] = {}
    # The part each module plays, by role: the module names (matched as PEFT matches
    # target_modules) of the attention's "q", "k", "v", "o", the MLP's "mlp_in" and "mlp_out",
    # and the "norms". Adapter methods derive their default targets from roles (a method's
    # `default_roles`), so a family declares no table per method.
    module_roles: ClassVar[dict[str, tuple[str, ...]]] = {}
    # {model_type: {method name: modules}}: where PEFT's own default table for a method departs
    # from what the roles give (PEFT's choices, kept so defaults agree with PEFT's).
    peft_default_exceptions: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {}

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def tensors(self) -> list[tables.Tensor]:
        """Every checkpoint tensor this model has, with tree path, HF key and shape."""
        return tables.expand(self.tensor_table, self.config, self.config.num_layers)

    # A family whose module names changed between transformers versions (ViT) maps the other
    # naming onto its own; the rest never renamed.
    @staticmethod
    def checkpoint_key(key: str) -> str:
        """A checkpoint key in the names the tensor table uses."""
        return key

    @staticmethod
    def adapter_key(key: str) -> str:
        """A PEFT adapter key in the tree's module names."""
        return key

    @staticmethod
    def adapter_module_name(name: str) -> str:
        """A PEFT target_modules entry in the tree's module names."""
        return name

    def with_remat(self, remat: bool) -> "Model":
        """This model with every layer recomputed in the backward pass (see `recomputed_in_backward`)."""
        if not isinstance(remat, bool):
            raise LowraxError(f"remat must be true or false, got {remat!r}")
        return dataclasses.replace(self, remat=remat)

    def layer(self, layer_fn: Callable) -> Callable:
        """`layer_fn(params, x, *rest)` as the forward calls it: recomputed in the backward pass under remat."""
        hook = LAYER_HOOK.get()
        if hook is not None:
            return hook(layer_fn)
        return recomputed_in_backward(layer_fn) if getattr(self, "remat", False) else layer_fn

    @staticmethod
    def activation_dtype(params):
        """The activations' dtype: the first floating leaf's (NF4 weights hold uint8 codes)."""
        return next(x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))

    @staticmethod
    def update_cache(kv_cache, k, v, cache_index):
        """Write this step's k, v [b, t, k, d] into the cache at `cache_index`.

        Returns the keys/values to attend over and the new cache entry; without a
        cache the step attends over its own keys only.
        """
        if kv_cache is None:
            return k, v, None
        cached_k, cached_v = kv_cache
        cached_k = jax.lax.dynamic_update_slice_in_dim(cached_k, k.astype(cached_k.dtype), cache_index, axis=1)
        cached_v = jax.lax.dynamic_update_slice_in_dim(cached_v, v.astype(cached_v.dtype), cache_index, axis=1)
        return cached_k, cached_v, (cached_k, cached_v)

    def classifier_architecture(self) -> str:
        """The transformers class of this family with a classification head (config.json's architectures)."""
        raise LowraxError(f"{self.model_type} models take no classification head")

    def with_classification_head(self, params: dict, num_labels: int, key) -> tuple["Model", dict]:
        """This encoder with a fresh `num_labels`-way classification head (normal(0.02) kernels, zero biases,
        as transformers initialises one) and params holding it; for families whose config has num_labels."""
        hf = {k: v for k, v in self.config.hf.items() if k not in ("id2label", "label2id", "num_labels")}
        hf |= {"architectures": [self.classifier_architecture()], "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
               "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}  # so the saved config.json builds this head
        headed = type(self)(dataclasses.replace(self.config, num_labels=num_labels, hf=hf))
        out = dict(params)
        dtype = self.activation_dtype(params)
        for i, t in enumerate(x for x in headed.tensors() if x.path[0] == "classifier"):
            value = (0.02 * jax.random.normal(jax.random.fold_in(key, i), t.shape) if t.path[-1] == "kernel"
                     else jnp.zeros(t.shape))
            tables.set_path(out, t.path, value.astype(dtype))
        return headed, out

    def param_shapes(self) -> dict:
        """A tree of `jax.ShapeDtypeStruct` (float32) with the structure `load_pretrained` returns."""
        tree: dict = {}
        for t in self.tensors():
            if not t.optional:
                tables.set_path(tree, t.path, jax.ShapeDtypeStruct(t.shape, jnp.float32))
        return tree


class CausalLM(Model):
    """A decoder-only LM; subclasses implement `hidden_states` and `logits_from_hidden`."""

    is_causal_lm: ClassVar[bool] = True

    def apply(self, params, input_ids, attention_mask=None, position_ids=None, segment_ids=None, adapter_names=None):
        """Logits [b, t, vocab] for input_ids [b, t].

        attention_mask [b, t] (1 = token, 0 = padding) may pad on either side;
        position ids default to counting real tokens only, so a left-padded
        sequence gets the same positions as unpadded. segment_ids [b, t] (1, 2, ...
        per packed example, 0 for padding) keep packed examples from attending to
        each other and restart their positions. adapter_names: with named adapters, one
        name per row ("__base__": none), as PEFT's `adapter_names=`.
        """
        params = rows_for_adapters(params, adapter_names, input_ids.shape[0])
        hidden = self.final_hidden(params, input_ids, attention_mask, position_ids, segment_ids)
        return self.logits_from_hidden(resolve(params), hidden)

    def final_hidden(self, params, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                     adapter_names=None):
        """Final-norm hidden states [b, t, hidden] (what `apply` projects to logits)."""
        params = resolve(rows_for_adapters(params, adapter_names, input_ids.shape[0]))
        prompt = virtual_tokens(params)
        if prompt is not None:
            if segment_ids is not None:
                raise LowraxError(f"packed sequences (segment_ids) cannot carry {prompt.peft_type}'s virtual tokens, "
                                  "which belong at the start of each sequence; train without packing")
            return self._hidden_after_virtual_tokens(params, prompt, input_ids, attention_mask, position_ids)
        if segment_ids is not None:
            key_valid = segment_visibility(segment_ids)
            if position_ids is None:
                position_ids = segment_positions(segment_ids)
        else:
            if attention_mask is None:
                attention_mask = jnp.ones(input_ids.shape, jnp.int32)
            key_valid = attention_mask.astype(bool)
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)
        hidden, _ = self.hidden_states(params, input_ids, position_ids, key_valid)
        return hidden

    def word_embedding_table(self, params):
        """The input embedding table [vocab, hidden] of a resolved tree (family-specific)."""
        raise NotImplementedError(f"{type(self).__name__} must implement word_embedding_table")

    # --- virtual tokens (prompt tuning, P-tuning, prefix tuning) ----------------------
    #
    # The adapter's v virtual tokens come before every sequence, at positions 0..v-1 and
    # cache slots 0..v-1, with the caller's tokens from position v on (as PEFT's models
    # see them): prompt tuning puts v embeddings before the input's, prefix tuning puts v
    # keys and values in every layer's cache. Outputs cover the caller's tokens only.

    def _hidden_after_virtual_tokens(self, params, prompt, input_ids, attention_mask, position_ids):
        b, t = input_ids.shape
        v = prompt.num_virtual_tokens
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        positions = (positions_from_mask(attention_mask) if position_ids is None else position_ids) + v
        key_valid = jnp.concatenate([jnp.ones((b, v), bool), attention_mask.astype(bool)], axis=1)
        hidden, _ = self._run_after_virtual_tokens(params, prompt, input_ids, positions, key_valid, None)
        return hidden

    def _run_after_virtual_tokens(self, params, prompt, input_ids, positions, key_valid, cache):
        """(hidden states of the caller's tokens [b, t], cache) with the adapter's v virtual tokens
        in slots 0..v-1. positions: the caller's tokens' (from v on); key_valid: over the cache,
        or over the v + t keys without one (training and evaluation: a cache is made for a prefix)."""
        b, t = input_ids.shape
        v = prompt.num_virtual_tokens
        prefix = prompt.prefix_key_values()
        if prefix is not None:
            if cache is None:
                cache = self.init_cache(b, v + t, self.activation_dtype(params))
            return self.hidden_states(params, input_ids, positions, key_valid, self._with_prefix(cache, prefix), v)
        table = prompt.prompt_embeddings()  # computed once: P-tuning runs its encoder here
        if cache is None and not (self.has_dropout() and model_dropout_key(params) is not None):
            # Attention is causal and every virtual token is valid, so the virtual tokens see only each
            # other and their keys and values are the same in every row: computed once, at batch 1, then
            # the rows' tokens run after them as after prefix tuning's (b * t rows, not b * (v + t)).
            # With the model's dropout on, each row draws its own masks over them, as PEFT's rows do.
            cache = self.init_cache(b, v + t, self.activation_dtype(params))
            hidden, _ = self.hidden_states(params, input_ids, positions, key_valid,
                                           self._with_prefix(cache, self._virtual_key_values(params, table)), v)
            return hidden, None
        embeds = jnp.broadcast_to(table[None], (b,) + table.shape)
        all_positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(v)[None], (b, v)), positions], axis=1)
        hidden, cache = self.hidden_states(params, input_ids, all_positions, key_valid, cache,
                                           None if cache is None else 0, prompt_embeds=embeds)
        return hidden[:, v:], cache

    def _virtual_key_values(self, params, table):
        """Each layer's keys and values [v, kv_heads, head_dim] of virtual tokens `table` [v, hidden]
        at positions 0..v-1, computed as one sequence of them alone."""
        v = table.shape[0]
        _, cache = self.hidden_states(params, jnp.zeros((1, 0), jnp.int32), jnp.arange(v)[None],
                                      jnp.ones((1, v), bool), self.init_cache(1, v, self.activation_dtype(params)), 0,
                                      prompt_embeds=table[None])
        return [(k[0], values[0]) for k, values in cache]

    def has_dropout(self) -> bool:
        """Whether a training step drops anything out in this model (a `*dropout` rate of its config above 0)."""
        return any(isinstance(value, (int, float)) and value > 0
                   for name, value in vars(self.config).items() if name.endswith("dropout"))

    @staticmethod
    def _with_prefix(cache, prefix):
        """The cache with each layer's prefix keys/values [v, kv_heads, head_dim] in slots 0..v-1."""
        out = []
        for (k, v), (pk, pv) in zip(cache, prefix):
            b = k.shape[0]
            pk = jnp.broadcast_to(pk[None].astype(k.dtype), (b,) + pk.shape)
            pv = jnp.broadcast_to(pv[None].astype(v.dtype), (b,) + pv.shape)
            out.append((jax.lax.dynamic_update_slice_in_dim(k, pk, 0, axis=1),
                        jax.lax.dynamic_update_slice_in_dim(v, pv, 0, axis=1)))
        return out

    def position_limit(self) -> int | None:
        """Positions the model addresses (its config's context length); None when it names none."""
        for name in ("max_positions", "max_position_embeddings"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @staticmethod
    def virtual_token_count(params) -> int:
        """Cache slots the adapter's virtual tokens take before each prompt (0 for most methods)."""
        prompt = virtual_tokens(params)
        return 0 if prompt is None else prompt.num_virtual_tokens

    # --- generation with a fixed-size KV cache -------------------------------------

    @staticmethod
    def query_slots(x, cache_index):
        """Slot of each query token in the key sequence: [b, t] (x: the [b, t, ...] inputs)."""
        b, t = x.shape[:2]
        start = 0 if cache_index is None else cache_index
        return jnp.broadcast_to(start + jnp.arange(t)[None, :], (b, t))

    @staticmethod
    def with_prompt(word_embeddings, prompt_embeds):
        """The input's word embeddings [b, t, h] after the virtual tokens' [b, v, h] (prompt tuning)."""
        if prompt_embeds is None:
            return word_embeddings
        return jnp.concatenate([prompt_embeds.astype(word_embeddings.dtype), word_embeddings], axis=1)

    def init_cache(self, batch: int, length: int, dtype=jnp.float32):
        """An empty KV cache for `batch` sequences of up to `length` tokens."""
        shape = self.kv_shape(batch, length)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.config.num_layers)]

    def prefill(self, params, input_ids, attention_mask, cache):
        """Run the (left-padded) prompt [b, t] through the model, filling cache slots 0..t-1.

        Returns (logits of the last position [b, vocab], cache, next positions [b]).
        The key-validity mask covers the whole cache: prompt padding is invalid,
        every later slot valid once written (causality hides unwritten ones).
        """
        params = resolve(params)
        b, t = input_ids.shape
        length = cache[0][0].shape[1]
        prompt = virtual_tokens(params)
        v = 0 if prompt is None else prompt.num_virtual_tokens  # slots before the prompt (see above)
        positions = positions_from_mask(attention_mask) + v
        key_valid = jnp.concatenate(
            [jnp.ones((b, v), bool), attention_mask.astype(bool), jnp.ones((b, length - v - t), bool)], axis=1
        )
        if prompt is None:
            hidden, cache = self.hidden_states(params, input_ids, positions, key_valid, cache, 0)
        else:
            hidden, cache = self._run_after_virtual_tokens(params, prompt, input_ids, positions, key_valid, cache)
        logits = self.logits_from_hidden(params, hidden[:, -1])
        return logits, cache, positions[:, -1] + 1, key_valid

    def decode_step(self, params, token, position, key_valid, cache, cache_index):
        """One token per sequence: token [b], position [b] -> (logits [b, vocab], cache)."""
        params = resolve(params)
        hidden, cache = self.hidden_states(
            params, token[:, None], position[:, None], key_valid, cache, cache_index
        )
        return self.logits_from_hidden(params, hidden[:, 0]), cache
