"""Every adapter method lowrax can place on T5 and ViT: wrapped, saved for PEFT, loaded by PEFT with equal
outputs, loaded back by lowrax, and merged (random small configs, float32). Prompt learning and bottleneck
adapters are refused on both (tests/test_t5.py, the ViT model's apply)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the method matrix needs the torch reference (pip install -e .[test])")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="the method matrix needs peft (pip install -e .[test])")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from tests.test_peft_exchange import randomize  # noqa: E402

T5_TARGETS, VIT_TARGETS = ("q", "v", "wo"), ("q_proj", "v_proj", "fc2")
# method -> (lowrax config for targets, method-specific keyword arguments); OFT blocks of 8 divide every input width
METHODS = {
    "lora": lambda t: lowrax.LoraConfig(r=4, alpha=8, target_modules=t),
    "dora": lambda t: lowrax.LoraConfig(r=4, alpha=8, target_modules=t, variant="dora"),
    "vera": lambda t: lowrax.LoraConfig(r=4, alpha=8, target_modules=t, variant="vera"),
    "lora_fa": lambda t: lowrax.LoraConfig(r=4, alpha=8, target_modules=t, variant="lora_fa"),
    "adalora": lambda t: lowrax.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=t),
    "ia3": lambda t: lowrax.IA3Config(target_modules=t, feedforward_modules=t[-1:]),
    "loha": lambda t: lowrax.LoHaConfig(r=4, alpha=8, target_modules=t),
    "lokr": lambda t: lowrax.LoKrConfig(r=4, alpha=8, target_modules=t),
    "oft": lambda t: lowrax.OFTConfig(oft_block_size=8, target_modules=t),
    "ln_tuning": lambda t: lowrax.LNTuningConfig(target_modules=("layer_norm",) if t == T5_TARGETS else ("layernorm_before",)),
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0, relative_attention_num_buckets=8))
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16, patch_size=4,
        num_labels=3))
    out = {}
    rng = np.random.default_rng(0)
    for name, hf in (("t5", t5), ("vit", vit)):
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        model, params = lowrax.load_pretrained(path, progress=False)
        if name == "t5":
            ids = rng.integers(2, 64, (2, 9))
            inputs = dict(input_ids=ids, attention_mask=np.ones_like(ids), decoder_input_ids=rng.integers(2, 64, (2, 6)))
        else:
            inputs = dict(pixel_values=rng.normal(size=(2, 3, 16, 16)).astype(np.float32))
        out[name] = (path, type(hf), model, params, inputs)
    return out


def run_ours(model, params, inputs):
    if model.is_seq2seq:
        return np.asarray(model.apply(params, jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]),
                                      decoder_input_ids=jnp.asarray(inputs["decoder_input_ids"])))
    return np.asarray(model.apply(params, jnp.asarray(inputs["pixel_values"])).logits)


def run_torch(hf, inputs):
    with torch.no_grad():
        return hf(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()



@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", ["t5", "vit"])
def test_method_on_family_crosses_with_peft_and_merges(families, family, method, tmp_path):
    path, hf_class, model, params, inputs = families[family]
    cfg = METHODS[method](T5_TARGETS if family == "t5" else VIT_TARGETS)
    initial = lowrax.wrap(params, cfg, jax.random.key(1), model=model)
    wrapped = randomize(initial, jax.random.key(2))
    ours = run_ours(model, wrapped, inputs)
    base = run_ours(model, params, inputs)
    assert np.abs(ours - base).max() > 2e-3 * np.abs(base).max()  # the adapter does something (ViT's logits are small)
    lowrax.save_peft(wrapped, tmp_path / "adapter", model, initial=initial)
    theirs = peft.PeftModel.from_pretrained(hf_class.from_pretrained(path), tmp_path / "adapter").eval()
    assert np.abs(ours - run_torch(theirs, inputs)).max() <= 1e-4
    back = lowrax.load_peft(params, tmp_path / "adapter", model)
    np.testing.assert_allclose(run_ours(model, back, inputs), ours, atol=1e-5)
    np.testing.assert_allclose(run_ours(model, lowrax.merge(wrapped), inputs), ours, atol=1e-4)
