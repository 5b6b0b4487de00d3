"""Causal-LM families against transformers on random small configs, float32."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the torch reference (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from tests.conftest import forward, hf_model_dir, random_batch  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
    "llama-tied-bias": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=4, tie_word_embeddings=True,
                                                        attention_bias=True, mlp_bias=True),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral-window": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
    "phi3-partial-window": lambda: transformers.Phi3Config(
        **SMALL, num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=5, pad_token_id=0, bos_token_id=1,
        eos_token_id=2),
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    config = CONFIGS[request.param]()
    path, hf = hf_model_dir(tmp_path_factory, request.param, lambda: transformers.AutoModelForCausalLM.from_config(config))
    model, params = lowrax.load_pretrained(path, progress=False)
    return hf, model, params


def reference_logits(hf, ids, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.parametrize("lengths,left", [([7], False), ([16, 16], False), ([12, 5, 9], True), ([3, 11], False)])
def test_logits_match_transformers(pair, lengths, left):
    hf, model, params = pair
    ids, mask = random_batch(model.config.vocab_size, lengths, pad_id=0, left=left)
    ours = np.asarray(forward(model)(params, jnp.asarray(ids), jnp.asarray(mask)))
    ref = reference_logits(hf, ids, mask)
    valid = mask.astype(bool)
    assert ours.shape == ref.shape
    assert np.abs(ours[valid] - ref[valid]).max() <= 1e-4


def test_left_padding_does_not_change_logits(pair):
    _, model, params = pair
    ids, mask = random_batch(model.config.vocab_size, [6], pad_id=0, left=True)
    padded_ids = np.concatenate([np.zeros((1, 4), np.int64), ids], axis=1)
    padded_mask = np.concatenate([np.zeros((1, 4), np.int64), mask], axis=1)
    plain = np.asarray(forward(model)(params, jnp.asarray(ids), jnp.asarray(mask)))
    padded = np.asarray(forward(model)(params, jnp.asarray(padded_ids), jnp.asarray(padded_mask)))[:, 4:]
    assert np.abs(plain - padded).max() <= 1e-5


def test_cached_generation_matches_full_forward(pair):
    """Greedy decoding through the KV cache equals argmax of a full forward at every step."""
    _, model, params = pair
    prompts = [[5, 9, 17, 3], [40, 2, 7]]
    new = lowrax.generate_ids(model, params, prompts, max_new_tokens=6)
    for prompt, continuation in zip(prompts, new):
        # One causal forward over the whole sequence holds every step's full-forward logits.
        logits = forward(model)(params, jnp.asarray([list(prompt) + list(continuation)]))[0]
        steps = logits[len(prompt) - 1:len(prompt) - 1 + len(continuation)]
        assert [int(t) for t in jnp.argmax(steps, axis=-1)] == list(continuation)


def test_save_pretrained_round_trips_through_transformers(pair, tmp_path):
    hf, model, params = pair
    out = lowrax.save_pretrained(params, model, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = random_batch(model.config.vocab_size, [9, 4], pad_id=0, left=True)
    assert np.abs(reference_logits(reloaded, ids, mask) - reference_logits(hf, ids, mask)).max() == 0.0


def test_bfloat16_base_with_float32_lora(pair):
    """A bfloat16 base (model.dtype=bfloat16) computes in bfloat16 close to float32, and a float32 LoRA on
    it gets float32 gradients (mixed precision from the tree)."""
    import jax

    _, model, params = pair
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ids, mask = random_batch(model.config.vocab_size, [10, 6], pad_id=0, left=True)
    ref = np.asarray(forward(model)(params, jnp.asarray(ids), jnp.asarray(mask)))
    got = forward(model)(bf16, jnp.asarray(ids), jnp.asarray(mask))
    assert got.dtype == jnp.bfloat16
    valid = mask.astype(bool)
    assert np.abs(np.asarray(got, np.float32)[valid] - ref[valid]).max() <= 0.05 * np.abs(ref[valid]).max()
    wrapped = lowrax.wrap(bf16, lowrax.LoraConfig(r=4, target_modules="all-linear", init="random"), jax.random.key(0))
    trainable, frozen = lowrax.split(wrapped)
    loss = lambda t: forward(model)(lowrax.combine(t, frozen), jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32).std()  # noqa: E731
    grads = jax.tree.leaves(jax.grad(loss)(trainable))
    assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all() for g in grads)
    assert max(float(jnp.abs(g).max()) for g in grads) > 0
