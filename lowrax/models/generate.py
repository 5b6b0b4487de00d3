"""Text generation with a fixed-size KV cache.

The prompt batch is left-padded to a bucketed length and run once (prefill);
then one jitted step per token reads and writes the cache in place. The
step's shapes depend only on (batch, cache length), so it is compiled once
per generation call (and reused across calls with the same bucket), never
per token or per prompt length.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.core.slot_directory import SLOTS_KEY, anonymous, has_named_adapters, with_adapter_rows
from lowrax.errors import LowraxError
from lowrax.models.base import CausalLM
from lowrax.models.sampling import SamplingConfig, collect_tokens, sample_next
from lowrax.models.seq2seq_generate import generate_seq2seq_ids

PROMPT_BUCKET = 32
CACHE_BUCKET = 64


_COMPILED: dict = {}


def _compiled(model: CausalLM, sampling: SamplingConfig, repeats: int = 1):
    """(prefill, step) jitted for this model and sampling rule, built once and reused. With repeats > 1 the
    prefill runs each prompt once and hands every later step `repeats` copies of its cache, one per
    completion sampled from it."""
    key = (id(model), sampling, repeats)
    if key not in _COMPILED:

        def prefill(params, input_ids, attention_mask, cache, rng):
            logits, cache, position, key_valid = model.prefill(params, input_ids, attention_mask, cache)
            if repeats > 1:  # row i of the prompts becomes rows i * repeats ... (i + 1) * repeats - 1
                logits, position, key_valid, cache = jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=0),
                                                                  (logits, position, key_valid, cache))
            return sample_next(logits, rng, sampling), cache, position, key_valid

        def step(params, token, position, key_valid, cache, cache_index, rng):
            logits, cache = model.decode_step(params, token, position, key_valid, cache, cache_index)
            return sample_next(logits, rng, sampling), cache

        # the repeated prefill's cache outgrows the one it is given: nothing to donate
        _COMPILED[key] = (model, jax.jit(prefill, donate_argnums=(3,) if repeats == 1 else ()),
                          jax.jit(step, donate_argnums=(4,)))
    return _COMPILED[key][1:]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [batch, PROMPT_BUCKET-rounded longest prompt]: every prompt ends at the same slot, as the
    generator runs them (and as GRPO's loss takes them back)."""
    width = _round_up(max(len(p) for p in prompts), PROMPT_BUCKET)
    ids = np.full((len(prompts), width), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


def _check_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = model.position_limit()
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        room = max(limit - prompt_tokens, 0)
        text = (f"the longest prompt ({prompt_tokens} tokens) plus {{}} ({max_new_tokens}) needs "
                f"{prompt_tokens + max_new_tokens} positions, but {model.model_type} addresses {limit}; "
                + (f"ask for at most {room} new tokens" if room else "shorten the prompt"))
        raise LowraxError(text.format("max_new_tokens"), cli=text.format("--max-new-tokens"))


def free_device_memory(device) -> int | None:
    """Bytes `device` can still allocate: an accelerator's limit less what is in use, the host's
    MemAvailable for the CPU; None where neither is known."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None


def _check_cache_fits(model, batch: int, cache_len: int, dtype, max_new_tokens: int) -> None:
    """Refuse a KV cache larger than the device's free memory (what the weights and everything else
    already loaded leave) before allocating it: an error instead of an OOM kill later."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch, cache_len, dtype))
    needed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    device = jax.devices()[0]
    available = free_device_memory(device)
    if available is not None and needed > 0.8 * available:
        text = (f"{{}}={max_new_tokens} with {batch} prompt(s) needs a {needed / 2**30:.1f} GiB KV cache, more than "
                f"this {device.platform.upper()} device has free ({available / 2**30:.1f} GiB); ask for fewer tokens")
        raise LowraxError(text.format("max_new_tokens"), cli=text.format("--max-new-tokens"))


def generate_ids(
    model: CausalLM,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    seed: int = 0,
    on_token: Callable[[np.ndarray], None] | None = None,
    adapter_names: Sequence[str] | None = None,
    repeats: int = 1,
) -> list[list[int]]:
    """Continue each token-id prompt; returns the new ids of each (stopping after an EOS id).
    For an encoder-decoder (T5) each prompt is the encoder's input and the ids are the decoder's.

    on_token: called with each step's new ids (one per row) as soon as they exist, for streaming.
    adapter_names: with named adapters, the adapter of each prompt ("__base__": none).
    repeats: continue each prompt this many times (consecutive rows of the result), from one prefill of it
    (RL's several completions per prompt; sample, or every copy is the same).
    """
    if not (model.is_causal_lm or model.is_seq2seq):
        raise LowraxError(f"generation needs a causal LM or an encoder-decoder; {model.model_type} is an encoder")
    if max_new_tokens < 1:
        raise LowraxError(f"max_new_tokens must be >= 1, got {max_new_tokens}",
                          cli=f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LowraxError("every prompt needs at least one token")
    if repeats < 1:
        raise LowraxError(f"repeats must be >= 1, got {repeats}")
    batch = len(prompts)
    if model.is_seq2seq:  # prompts are the encoder's inputs; the decoder starts from its start token
        if repeats > 1:
            prompts = [p for p in prompts for _ in range(repeats)]
            adapter_names = None if adapter_names is None else [a for a in adapter_names for _ in range(repeats)]
        params = _per_row_adapters(params, adapter_names, len(prompts))
        return generate_seq2seq_ids(model, params, prompts, max_new_tokens, sampling, eos_token_ids, pad_token_id,
                                    seed, on_token, PROMPT_BUCKET, CACHE_BUCKET)
    prompt_params = _per_row_adapters(params, adapter_names, batch)
    ids, mask = left_padded(prompts, pad_token_id)
    prompt_len = ids.shape[1]
    virtual = model.virtual_token_count(prompt_params)  # slots before the prompt (prompt and prefix tuning)
    _check_length(model, virtual + max(len(p) for p in prompts), max_new_tokens)
    cache_len = _round_up(virtual + prompt_len + max_new_tokens, CACHE_BUCKET)
    # The activations' dtype: the first floating leaf (NF4 weights hold uint8 codes).
    dtype = model.activation_dtype(prompt_params)
    _check_cache_fits(model, batch * repeats, cache_len, dtype, max_new_tokens)
    prefill, step = _compiled(model, sampling, repeats)
    rng = jax.random.key(seed)
    rng, sub = jax.random.split(rng)
    cache = model.init_cache(batch, cache_len, dtype)
    token, cache, position, key_valid = prefill(prompt_params, jnp.asarray(ids), jnp.asarray(mask), cache, sub)
    if repeats == 1:
        params = prompt_params
    else:  # every copy of a prompt keeps its adapter
        names = None if adapter_names is None else [a for a in adapter_names for _ in range(repeats)]
        params = _per_row_adapters(params, names, batch * repeats)

    def next_token(token, i, key):
        nonlocal cache
        token, cache = step(params, token, position + i, key_valid, cache, jnp.int32(virtual + prompt_len + i), key)
        return token

    return collect_tokens(token, next_token, max_new_tokens, eos_token_ids, rng, on_token)


def _per_row_adapters(params, adapter_names, batch: int):
    """With named adapters: params with one slot per row (the active one where no names are
    given) and without the adapters' names, so the compiled prefill and step serve any mix of the
    loaded adapters, and loads into free slots, without recompiling."""
    if not has_named_adapters(params):
        if adapter_names is not None:
            raise LowraxError("adapter_names needs named adapters: load them with "
                              "lowrax.load_peft(params, adapter_dir, model, adapter_name='a')")
        return params
    if adapter_names is None:
        active = params[SLOTS_KEY].active
        if jnp.ndim(active) != 0:
            raise LowraxError("these params choose an adapter per row already; pass adapter_names= to generate instead")
        adapter_names = jnp.full((batch,), active, jnp.int32)
    return anonymous(with_adapter_rows(params, adapter_names, batch))


def eos_ids(tokenizer, model: CausalLM) -> list[int]:
    """EOS ids from the tokenizer and the model config (which may list several)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg_eos = getattr(model.config, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, (list, tuple)):
        ids.update(int(i) for i in cfg_eos)
    return sorted(ids)


def encode_prompt(tokenizer, prompt: str, chat: bool | None) -> list[int]:
    """Token ids of a prompt, wrapped in the chat template when asked (None: when the tokenizer has one)."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LowraxError("chat=True but this tokenizer has no chat template",
                              cli="--chat on needs a chat template, and this tokenizer has none; use --chat off")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt)["input_ids"])


def generate(
    model: CausalLM,
    params,
    tokenizer,
    prompts: str | Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool | None = None,
    adapter_names: Sequence[str] | None = None,
) -> list[str]:
    """Generate a continuation for each prompt (a string or a list); returns the decoded new text.

    Greedy when temperature is 0, else sampling with optional top-k / top-p.
    chat=None applies the tokenizer's chat template when it has one.
    adapter_names: with named adapters, the adapter of each prompt ("__base__": none).
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    encoded = [encode_prompt(tokenizer, t, chat) for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    new_ids = generate_ids(
        model, params, encoded, max_new_tokens, SamplingConfig(temperature, top_k, top_p),
        eos_ids(tokenizer, model), pad, seed, adapter_names=adapter_names,
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
