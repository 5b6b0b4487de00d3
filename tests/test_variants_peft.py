"""VeRA, DoRA, rsLoRA and PiSSA adapters cross between lowrax and PEFT with equal logits (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PEFT exchange tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="PEFT exchange tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

import lowrax  # noqa: E402
from tests.conftest import hf_model_dir, random_batch  # noqa: E402
from tests.test_peft_exchange import SMALL, lowrax_outputs, randomize, torch_outputs  # noqa: E402

MODELS = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2)),
              ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
             ["c_attn", "c_fc"]),
}
# variant: (lowrax LoraConfig kwargs, PEFT config class, PEFT kwargs giving a non-trivial adapter)
VARIANTS = {
    "vera": (dict(variant="vera", r=4), "VeraConfig", dict(r=4, init_weights=False)),
    "dora": (dict(variant="dora", r=4, alpha=8), "LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)),
    "rslora": (dict(r=4, alpha=8, use_rslora=True), "LoraConfig", dict(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False)),
    "pissa": (dict(r=4, alpha=8, init="pissa"), "LoraConfig", dict(r=4, lora_alpha=8, init_lora_weights="pissa")),
}
# Every variant on Llama; the variants with their own GPT-2 handling (Conv1D, fan_in_fan_out) on GPT-2 too.
CASES = [("llama", v) for v in sorted(VARIANTS)] + [("gpt2", "vera"), ("gpt2", "dora")]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """family -> (path, model, params, targets), each built and saved once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            builder, targets = MODELS[family]
            path, _ = hf_model_dir(tmp_path_factory, family, builder)
            cache[family] = (path, *lowrax.load_pretrained(path, progress=False), targets)
        return cache[family]

    return get


def fresh_torch_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def peft_config(variant, targets, model_type):
    _, cls, kwargs = VARIANTS[variant]
    extra = {"fan_in_fan_out": True} if model_type == "gpt2" else {}
    return getattr(peft, cls)(target_modules=targets, **kwargs, **extra)


@pytest.mark.parametrize("family,variant", CASES)
def test_lowrax_variant_adapter_loads_in_peft(saved_models, family, variant, tmp_path):
    path, model, params, targets = saved_models(family)
    ours = dict(VARIANTS[variant][0], target_modules=tuple(targets))
    initial = lowrax.lora.wrap(params, lowrax.LoraConfig(**ours), jax.random.key(1), model.model_type)
    trained = randomize(initial, jax.random.key(2))
    lowrax.save_peft(trained, tmp_path / "adapter", model, use_rslora=ours.get("use_rslora", False), initial=initial)
    peft_model = peft.PeftModel.from_pretrained(fresh_torch_model(path), tmp_path / "adapter").eval()
    ids, mask = random_batch(128, [9, 5], pad_id=0, left=True)
    valid = mask.astype(bool)
    ours_out = lowrax_outputs(model, trained, ids, mask)
    assert np.abs(ours_out[valid] - torch_outputs(peft_model, ids, mask, True)[valid]).max() <= 1e-4
    assert np.abs(ours_out - lowrax_outputs(model, params, ids, mask))[valid].max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("family,variant", CASES)
def test_peft_variant_adapter_loads_in_lowrax(saved_models, family, variant, tmp_path):
    path, model, params, targets = saved_models(family)
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(fresh_torch_model(path), peft_config(variant, targets, model.model_type))
    if variant == "pissa":  # PEFT's documented route: save the init, train, save converted to plain LoRA
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(tmp_path / "init")
        peft_model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # stand-in for training: move every adapter tensor away from its init
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.eval()
    convert = {"path_initial_model_for_weight_conversion": str(tmp_path / "init")} if variant == "pissa" else {}
    peft_model.save_pretrained(tmp_path / "adapter", **convert)
    wrapped = lowrax.load_peft(params, tmp_path / "adapter", model)
    ids, mask = random_batch(128, [7, 7], pad_id=0, left=False)
    diff = np.abs(lowrax_outputs(model, wrapped, ids, mask) - torch_outputs(peft_model, ids, mask, True)).max()
    assert diff <= 1e-4
    kinds = {type(n).__name__ for n in jax.tree.leaves(wrapped, is_leaf=lowrax.core.node.is_adapter) if lowrax.core.node.is_adapter(n)}
    assert kinds == {"vera": {"VeraKernel"}, "dora": {"DoraKernel"}}.get(variant, {"LoraKernel"})
