"""4-bit checkpoints exchanged with transformers + bitsandbytes (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch", reason="4-bit checkpoint tests need torch (pip install -e .[test])")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes", reason="4-bit checkpoint tests need bitsandbytes (pip install -e .[test])")

import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
import lowrax.io.hf_checkpoint  # noqa: E402
from lowrax.errors import CheckpointError  # noqa: E402
from lowrax.quant.nf4 import NF4Tensor  # noqa: E402
from tests.conftest import hf_model_dir  # noqa: E402

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
IDS = np.array([[3, 17, 42, 99, 5, 64, 7]])


def bnb_config(double_quant: bool):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def assert_same_weights(params, quantized_torch_model):
    """Every 4-bit layer of the torch model dequantizes (bitsandbytes) to lowrax's dequantized kernel."""
    import bitsandbytes.functional as F

    from lowrax.core import tables
    from lowrax.quant.nf4 import dequantize

    checked = 0
    for name, module in quantized_torch_model.named_modules():
        if type(module).__name__ == "Linear4bit":
            theirs = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float().numpy()
            ours = tables.get_path(params, tuple(name.split(".")) + ("kernel",))
            assert np.array_equal(np.asarray(dequantize(ours)).T, theirs), name
            checked += 1
    assert checked == 14  # 7 projections x 2 layers


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path, _ = hf_model_dir(tmp_path_factory, "llama-4bit-base",
                           lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)))
    return path


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_checkpoint_loads_into_lowrax(base_dir, tmp_path, double_quant):
    quantized = transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config(double_quant),
                                                                  device_map="cpu").eval()
    quantized.save_pretrained(tmp_path / "q4")
    model, params = lowrax.load_pretrained(tmp_path / "q4", progress=False)
    q_proj = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q_proj, NF4Tensor) and q_proj.double_quantized == double_quant and q_proj.shape == (64, 64)
    assert_same_weights(params, quantized)
    # Same weights, so the same logits as a float model holding them; bitsandbytes' own CPU
    # 4-bit matmul is approximate (1.8e-3 from x @ W.T on one layer), so it is compared loosely.
    dense = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    dense.load_state_dict(
        {k: torch.tensor(np.asarray(v)) for k, v in lowrax.io.hf_checkpoint.tree_to_hf_tensors(params, model).items()},
        strict=False)
    ours = np.asarray(model.apply(params, jnp.asarray(IDS)))
    assert np.abs(ours - torch_logits(dense)).max() <= 1e-4
    assert np.abs(ours - torch_logits(quantized)).max() <= 2e-2


@pytest.mark.parametrize("double_quant", [False, True])
def test_lowrax_4bit_checkpoint_loads_in_transformers(base_dir, tmp_path, double_quant):
    model, params = lowrax.load_pretrained(base_dir, progress=False)
    quantized = lowrax.quantize(params, lowrax.QuantConfig(double_quant=double_quant), model)
    out = lowrax.save_pretrained(quantized, model, tmp_path / "ours4", keep_nf4=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    assert type(theirs.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert_same_weights(quantized, theirs)
    ours = np.asarray(model.apply(quantized, jnp.asarray(IDS)))
    assert np.abs(ours - torch_logits(theirs)).max() <= 2e-2  # bitsandbytes' approximate CPU 4-bit matmul
    # and it round-trips through lowrax bit for bit
    _, again = lowrax.load_pretrained(out, progress=False)
    a = again["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]
    b = quantized["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]
    assert np.array_equal(np.asarray(a.packed), np.asarray(b.packed)) and np.array_equal(np.asarray(a.absmax), np.asarray(b.absmax))


def test_missing_statistics_are_named(base_dir, tmp_path):
    model, params = lowrax.load_pretrained(base_dir, progress=False)
    out = lowrax.save_pretrained(lowrax.quantize(params, lowrax.QuantConfig(), model), model, tmp_path / "q", keep_nf4=True)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.weight.absmax"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"4-bit weight model\.layers\.0\.mlp\.up_proj\.weight is missing its statistics: .*up_proj\.weight\.absmax"):
        lowrax.load_pretrained(out, progress=False)
