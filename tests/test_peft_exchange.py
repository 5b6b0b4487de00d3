"""Adapters cross between lowrax and PEFT with equal logits (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PEFT exchange tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="PEFT exchange tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from tests.conftest import hf_model_dir, random_batch  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)

CASES = {
    # name: (builder, lowrax LoraConfig, PEFT LoraConfig kwargs)
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2)),
              dict(r=4, alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 2}),
              dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)),
    "phi3-fused": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
                       **SMALL, num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)),
                   dict(r=4, alpha=8, target_modules=("qkv_proj", "gate_up_proj")),  # the fused weights, whole
                   dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj"], init_lora_weights=False)),
    "gemma2-defaults": (lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
                            **SMALL, num_key_value_heads=2, head_dim=16, sliding_window=4, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, attn_logit_softcapping=5.0)),
                        dict(r=4, alpha=8),  # PEFT's default targets for gemma2: q_proj, v_proj
                        dict(r=4, lora_alpha=8, init_lora_weights=False)),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
             dict(r=4, alpha=16, target_modules=("c_attn", "c_fc"), use_rslora=True),
             dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)),
    "bert-classifier": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3)),
                        dict(r=4, alpha=8, target_modules=("query", "value"), modules_to_save=("classifier",)),
                        dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                             task_type="SEQ_CLS", init_lora_weights=False)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    builder, ours, theirs = CASES[request.param]
    path, hf = hf_model_dir(tmp_path_factory, request.param, builder)
    model, params = lowrax.load_pretrained(path, progress=False)
    return path, hf, model, params, ours, theirs


def lowrax_outputs(model, params, ids, mask):
    out = model.apply(params, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(out if model.is_causal_lm else out.logits)


def check_merge_round_trip(model, wrapped, ids, mask):
    """Merging gives the adapted model's outputs; unmerging gives back the adapted tree."""
    merged = lowrax.merge(wrapped)
    np.testing.assert_allclose(lowrax_outputs(model, merged, ids, mask), lowrax_outputs(model, wrapped, ids, mask),
                               atol=2e-5, rtol=1e-5)
    back = lowrax.unmerge(merged, wrapped)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(wrapped)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)


def torch_outputs(hf_model, ids, mask, causal):
    """Logits of the torch model; causal LMs get lowrax's padding-aware position ids."""
    kwargs = {}
    if causal:
        kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).logits.numpy()


def randomize(params, key):
    """Give every adapter array random values (B included), as training would."""
    trainable, frozen = lowrax.split(params)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return lowrax.combine(jax.tree.unflatten(treedef, leaves), frozen)


def perturb_peft(peft_model, scale: float = 0.05):
    """The PEFT counterpart of `randomize`: noise on every trainable parameter, away from PEFT's init
    (zero for some forms, a copy of the table for trainable tokens). Returns the model, in eval mode."""
    with torch.no_grad():
        for parameter in (p for p in peft_model.parameters() if p.requires_grad):
            parameter.add_(scale * torch.randn_like(parameter))
    return peft_model.eval()


def test_lowrax_adapter_loads_in_peft(case, tmp_path):
    path, _, model, params, ours, _ = case
    wrapped = randomize(lowrax.lora.wrap(params, lowrax.LoraConfig(**ours), jax.random.key(1), model.model_type),
                        jax.random.key(2))
    lowrax.save_peft(wrapped, tmp_path / "adapter", model, use_rslora=ours.get("use_rslora", False))
    auto = transformers.AutoModelForCausalLM if model.is_causal_lm else transformers.AutoModelForSequenceClassification
    base = auto.from_pretrained(path, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids, mask = random_batch(128, [9, 5], pad_id=0, left=model.is_causal_lm)
    valid = mask.astype(bool) if model.is_causal_lm else slice(None)
    diff = np.abs(lowrax_outputs(model, wrapped, ids, mask)[valid] - torch_outputs(peft_model, ids, mask, model.is_causal_lm)[valid]).max()
    assert diff <= 1e-4
    # and the adapter changed the model (B is nonzero)
    assert np.abs(lowrax_outputs(model, params, ids, mask) - lowrax_outputs(model, wrapped, ids, mask)).max() > 1e-3


def test_peft_adapter_loads_in_lowrax(case, tmp_path):
    path, hf, model, params, _, theirs = case
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(**theirs)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    wrapped = lowrax.load_peft(params, tmp_path / "adapter", model)
    ids, mask = random_batch(128, [7, 7], pad_id=0, left=False)
    diff = np.abs(lowrax_outputs(model, wrapped, ids, mask) - torch_outputs(peft_model, ids, mask, model.is_causal_lm)).max()
    assert diff <= 1e-4
    peft_model.unload()  # restore the shared module-scoped torch model
