"""The embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the torch reference (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from lowrax.models.generate import encode_prompt  # noqa: E402
from lowrax.core import tables  # noqa: E402
from lowrax.models.gguf_model import unpermute_rows  # noqa: E402
from lowrax.models.pretrained import EMBEDDED_FILE  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    model, params = lowrax.load_pretrained(None, progress=False)
    tokenizer = lowrax.load_tokenizer(None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(lowrax.embedded_model_path().parent), gguf_file=EMBEDDED_FILE, dtype=torch.float32).eval()
    return model, params, tokenizer, hf


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    heads, head_dim, cols = 3, 8, 5
    hf_rows = rng.normal(size=(heads * head_dim, cols))
    # llama.cpp's convert script: rows of each head reshaped (2, half) -> (half, 2).
    permuted = hf_rows.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf_rows.shape)
    assert not np.array_equal(permuted, hf_rows)
    assert np.array_equal(unpermute_rows(permuted, heads), hf_rows)


def test_weights_equal_transformers_gguf_loader(smollm2):
    model, params, _, hf = smollm2
    state = hf.state_dict()
    assert model.config.num_heads == 9 and model.config.num_kv_heads == 3 and model.config.tie_word_embeddings
    for t in model.tensors():
        ours = t.to_hf(np.asarray(tables.get_path(params, t.path)))
        assert np.array_equal(ours, state[t.hf_key].numpy()), t.hf_key


def test_logits_match_transformers(smollm2):
    model, params, tokenizer, hf = smollm2
    batch = tokenizer(["The capital of France is", "Hello, my name is Ada and I"], padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids), jnp.asarray(mask)))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
    valid = mask.astype(bool)
    # SmolLM2's residual stream carries activations up to ~2e4, so float32 rounding alone
    # moves logits by ~5e-5 (transformers' own sdpa and eager kernels differ that much).
    # Without ops.dense_matmul's blocked sums, XLA:CPU's down projection made this 1.4e-4.
    assert np.abs(ours[valid] - ref[valid]).max() <= 1e-4
    assert (ours[valid].argmax(-1) == ref[valid].argmax(-1)).all()


def test_greedy_generation_matches_transformers(smollm2):
    model, params, tokenizer, hf = smollm2
    prompt = encode_prompt(tokenizer, "Write a long story about a dragon who learns to paint.", chat=True)
    ours = lowrax.generate_ids(model, params, [prompt], max_new_tokens=32, eos_token_ids=[tokenizer.eos_token_id])[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert len(ours) == 32
    assert ours == ref


def test_generate_text_and_chat_template(smollm2):
    model, params, tokenizer, _ = smollm2
    texts = lowrax.generate(model, params, tokenizer, ["What is the capital of France?", "Say hi."], max_new_tokens=12)
    assert len(texts) == 2 and "Paris" in texts[0]
    sampled = lowrax.generate(model, params, tokenizer, "Name a color.", max_new_tokens=8,
                              temperature=0.7, top_k=20, top_p=0.9, seed=1)
    assert isinstance(sampled, list) and len(sampled) == 1


def test_gguf_tokenizer_equals_transformers_gguf_tokenizer():
    """lowrax builds the GGUF tokenizer without torch; it must equal transformers' own."""
    ours = lowrax.load_tokenizer(None)
    theirs = transformers.AutoTokenizer.from_pretrained(str(lowrax.embedded_model_path().parent), gguf_file=EMBEDDED_FILE)
    texts = ["Hello, world!", "  leading spaces and\nnewlines\t tabs", "Ünïcödé 東京 🙂", "Convert 2031-07-04 to lowrax date format:"]
    for text in texts:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
        assert ours.decode(ours(text)["input_ids"]) == theirs.decode(theirs(text)["input_ids"])
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
