"""Bad input gets one clear error naming the problem and the expected form."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lowrax

LLAMA_CONFIG = {
    "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32, "tie_word_embeddings": True,
}


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A valid tiny llama checkpoint written by lowrax's own table (no torch needed)."""
    from lowrax.models import model_from_hf_config

    model = model_from_hf_config(LLAMA_CONFIG)
    rng = np.random.default_rng(0)
    tensors = {t.hf_key: rng.normal(size=t.hf_shape).astype(np.float32) for t in model.tensors()}
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path


def test_valid_tiny_checkpoint_loads(tiny_llama_dir):
    model, params = lowrax.load_pretrained(tiny_llama_dir, progress=False)
    assert model.apply(params, np.array([[1, 2, 3]])).shape == (1, 3, 32)


def test_missing_path(tmp_path):
    with pytest.raises(lowrax.NotAModelError, match="does not exist.*HF model directory or a .gguf"):
        lowrax.load_pretrained(tmp_path / "nope")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(lowrax.NotAModelError, match="is not a model: expected an HF model directory containing config.json"):
        lowrax.load_pretrained(tmp_path)


def test_unsupported_family_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(lowrax.UnsupportedModelError,
                       match=r"'mamba'.*bert, gemma2, gpt2, llama, mistral, phi3, qwen2, roberta, t5"):
        lowrax.load_pretrained(tmp_path)


def test_missing_tensor_is_named(tiny_llama_dir):
    path = tiny_llama_dir / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(lowrax.CheckpointError, match=r"missing tensor model\.layers\.0\.mlp\.up_proj\.weight"):
        lowrax.load_pretrained(tiny_llama_dir, progress=False)


def test_misshapen_tensor_is_named_with_both_shapes(tiny_llama_dir):
    path = tiny_llama_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(lowrax.CheckpointError,
                       match=r"k_proj\.weight: expected shape \(8, 16\), found \(16, 16\)"):
        lowrax.load_pretrained(tiny_llama_dir, progress=False)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    with pytest.raises(lowrax.CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        lowrax.load_pretrained(tmp_path)


def test_gguf_of_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(lowrax.UnsupportedModelError, match="GGUF architecture 'gpt2'.*llama"):
        lowrax.load_pretrained(path)


def test_save_refuses_to_clobber(tiny_llama_dir, tmp_path):
    model, params = lowrax.load_pretrained(tiny_llama_dir, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for overwrite in (False, True):  # a directory lowrax did not write is never replaced
        with pytest.raises(lowrax.LowraxError, match="was not written by lowrax"):
            lowrax.save_pretrained(params, model, out, overwrite=overwrite)
    assert (out / "keep.txt").read_text() == "precious"
    saved = lowrax.save_pretrained(params, model, tmp_path / "saved")
    with pytest.raises(FileExistsError, match="overwrite=True"):  # lowrax's own: replaced only when asked
        lowrax.save_pretrained(params, model, saved)
    lowrax.save_pretrained(params, model, saved, overwrite=True)


def test_sampling_options_are_checked():
    with pytest.raises(ValueError, match="top_p must be in"):
        lowrax.SamplingConfig(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        lowrax.SamplingConfig(temperature=-1.0)


def test_generation_past_the_position_limit_or_free_memory_is_refused_before_it_starts(tiny_llama_dir, monkeypatch):
    import jax

    from lowrax.models import generate as generation

    model, params = lowrax.load_pretrained(tiny_llama_dir, progress=False)
    with pytest.raises(lowrax.LowraxError, match=r"longest prompt \(3 tokens\) plus max_new_tokens \(40\) needs 43 "
                                                 r"positions, but llama addresses 32; ask for at most 29 new tokens"):
        generation.generate_ids(model, params, [[1, 2, 3]], max_new_tokens=40)
    free = generation.free_device_memory(jax.devices()[0])
    assert free is not None and 0 < free
    monkeypatch.setattr(generation, "free_device_memory", lambda device: 1000)  # what a loaded machine leaves
    with pytest.raises(lowrax.LowraxError, match=r"max_new_tokens=8 with 1 prompt\(s\) needs a .* GiB KV cache, more "
                                                 r"than this CPU device has free"):
        generation.generate_ids(model, params, [[1, 2, 3]], max_new_tokens=8)
