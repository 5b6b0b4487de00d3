"""The 8-bit base (bitsandbytes' Linear8bitLt storage) as a kernel type: bytes, checkpoints both ways, LoRA over it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch", reason="8-bit parity tests need torch (pip install -e .[test])")
transformers = pytest.importorskip("transformers")
bnb_functional = pytest.importorskip("bitsandbytes.functional",
                                     reason="8-bit parity tests need bitsandbytes (pip install -e .[test])")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from lowrax.core import tables  # noqa: E402
from lowrax.errors import CheckpointError, LowraxError  # noqa: E402
from lowrax.quant.int8 import Int8Tensor, dequantize_int8, quantize_int8  # noqa: E402
from tests.conftest import forward, hf_model_dir  # noqa: E402

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
IDS = np.array([[3, 17, 42, 99, 5, 64, 7]])


def test_quantized_bytes_equal_bitsandbytes():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 80)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)  # torch layout (out, in)
    codes, stats, _ = bnb_functional.int8_vectorwise_quant(torch.tensor(w).half())
    ours = quantize_int8(jnp.asarray(w.T), transpose=True)  # a Flax kernel (in, out) stored as bitsandbytes does
    np.testing.assert_array_equal(np.asarray(ours.codes), codes.numpy())
    np.testing.assert_array_equal(np.asarray(ours.row_absmax), stats.numpy())
    theirs = bnb_functional.int8_vectorwise_dequant(codes, stats).numpy()
    np.testing.assert_array_equal(np.asarray(dequantize_int8(ours, jnp.float32)), theirs.T)


def test_a_zero_row_stays_zero():
    w = np.zeros((4, 8), np.float32)
    w[1] = 1.0
    t = quantize_int8(jnp.asarray(w))
    assert np.asarray(t.codes)[0].tolist() == [0] * 8 and np.isfinite(np.asarray(dequantize_int8(t))).all()


def test_refuses_what_it_cannot_quantize():
    with pytest.raises(LowraxError, match="2-D floating-point"):
        quantize_int8(jnp.zeros((4, 4), jnp.int32))
    with pytest.raises(LowraxError, match="unknown quantization method 'int4'.*int8.*nf4"):
        lowrax.QuantConfig(method="int4")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path, _ = hf_model_dir(tmp_path_factory, "llama-int8-base",
                           lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)))
    return path


@pytest.fixture(scope="module")
def bnb_int8_dir(base_dir, tmp_path_factory):
    """The base quantized to 8 bits and saved by transformers + bitsandbytes on the CPU."""
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu").eval()
    out = tmp_path_factory.mktemp("int8") / "q8"
    quantized.save_pretrained(out)
    return out, quantized


def test_bitsandbytes_8bit_checkpoint_loads_with_its_bytes(bnb_int8_dir):
    directory, quantized = bnb_int8_dir
    _, params = lowrax.load_pretrained(directory, progress=False)
    files = load_file(str(directory / "model.safetensors"))
    checked = 0
    for name, module in quantized.named_modules():
        if type(module).__name__ == "Linear8bitLt":
            ours = tables.get_path(params, tuple(name.split(".")) + ("kernel",))
            assert isinstance(ours, Int8Tensor) and ours.shape == (module.in_features, module.out_features)
            np.testing.assert_array_equal(np.asarray(ours.codes), files[name + ".weight"])
            np.testing.assert_array_equal(np.asarray(ours.row_absmax), files[name + ".SCB"])
            checked += 1
    assert checked == 14  # 7 projections x 2 layers


def test_quantize_on_load_equals_bitsandbytes_and_saves_back(base_dir, bnb_int8_dir, tmp_path):
    directory, quantized = bnb_int8_dir
    model, params = lowrax.load_pretrained(base_dir, progress=False, quantize=lowrax.QuantConfig(method="int8"))
    theirs = load_file(str(directory / "model.safetensors"))
    out = lowrax.save_pretrained(params, model, tmp_path / "ours8", keep_quantized=True)
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["load_in_8bit"] and config["quant_method"] == "bitsandbytes"
    # transformers + bitsandbytes read it back as 8-bit layers holding the same codes
    again = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    layer = again.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear8bitLt"
    np.testing.assert_array_equal(layer.weight.data.numpy(), theirs["model.layers.0.self_attn.q_proj.weight"])
    # lowrax's forward multiplies by the dequantized weights; bitsandbytes' also rounds the activations to int8
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    dense_tensors = lowrax.io.hf_checkpoint.tree_to_hf_tensors(params, model)
    dense.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in dense_tensors.items()}, strict=False)
    with torch.no_grad():
        reference = dense(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model)(params, jnp.asarray(IDS))), reference, atol=1e-4)


def test_lora_over_an_int8_base_trains_merges_and_requantizes(base_dir):
    model, params = lowrax.load_pretrained(base_dir, progress=False, quantize=lowrax.QuantConfig(method="int8"))
    wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random"),
                          jax.random.key(0), model.model_type)
    node = wrapped["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(node.base, Int8Tensor)
    trainable, frozen = lowrax.split(wrapped)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))  # the codes and row scales stay frozen
    assert any(x.dtype == jnp.int8 for x in jax.tree.leaves(frozen))

    def loss(t):
        logits = forward(model)(lowrax.combine(t, frozen), jnp.asarray(IDS))
        return jnp.mean(logits ** 2)

    grads = jax.grad(loss)(trainable)
    assert float(jnp.abs(grads["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].b).sum()) > 0
    factored = forward(model)(wrapped, jnp.asarray(IDS))
    merged = lowrax.merge(wrapped)
    assert not isinstance(merged["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"], Int8Tensor)
    np.testing.assert_allclose(np.asarray(forward(model)(merged, jnp.asarray(IDS))), np.asarray(factored), atol=1e-4)
    requantized, report = lowrax.merge_requantized(wrapped)
    assert isinstance(requantized["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"], Int8Tensor)
    assert 0 < report["worst"]["relative"] < 0.02


def test_a_malformed_8bit_checkpoint_is_named(bnb_int8_dir, tmp_path):
    from safetensors.numpy import save_file

    directory, _ = bnb_int8_dir
    files = load_file(str(directory / "model.safetensors"))
    files["model.layers.0.self_attn.q_proj.SCB"] = files["model.layers.0.self_attn.q_proj.SCB"][:3]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((directory / "config.json").read_text())
    save_file(files, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj.weight: an 8-bit weight must be int8"):
        lowrax.load_pretrained(bad, progress=False)


def test_lowrax_train_with_an_int8_base_and_merge_requantized(tmp_path_factory, tmp_path):
    from lowrax.train.runs import merge_run
    from tests.conftest import tiny_llama_dir

    cfg = lowrax.load_config(None, [f"model.path={tiny_llama_dir(tmp_path_factory)}", "model.quantize=int8", "lora.r=4",
                                    "lora.target_modules=all-linear", "train.steps=3", "train.batch_size=4",
                                    "data.seq_len=16", "train.save_every=0", "train.eval_examples=0", "train.samples=0",
                                    f"train.output_dir={tmp_path / 'run'}", "optim.warmup_steps=0",
                                    "data.source=embedded_text", "data.default_eval_examples=4"])
    lowrax.run_training(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    out = merge_run(tmp_path / "run", tmp_path / "merged8", requantize=True, log=lambda *_: None)
    _, merged = lowrax.load_pretrained(out, progress=False)
    assert isinstance(merged["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"], Int8Tensor)
    assert json.loads((out / "merge_report.json").read_text())["worst"]["relative"] < 0.02
