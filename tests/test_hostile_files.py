"""Hostile model and adapter files: each damaged, foreign or malicious file is one LowraxError naming the
file and what is wrong; shard names never leave the model directory; NaN weights are refused by name."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lowrax
from lowrax.models.gguf_model import hf_config_from_gguf
from tests.test_bad_input import LLAMA_CONFIG, tiny_llama_dir  # noqa: F401  (fixture)


def _sharded(directory, weight_map):
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _damage_model(directory, how):
    weights = directory / "model.safetensors"
    key = "model.embed_tokens.weight"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "garbage":
        weights.write_text("this is not a safetensors file\n" * 10)
    elif how == "nan":
        tensors = load_file(str(weights))
        tensors[key][0, 0] = np.nan
        save_file(tensors, str(weights))
    elif how == "inf":
        tensors = load_file(str(weights))
        tensors["model.norm.weight"][:] = np.inf
        save_file(tensors, str(weights))
    elif how in ("escape", "absolute", "index-json", "no-weight-map", "weight-map-list", "shard-not-string"):
        weights.rename(directory / "model-00001.safetensors")
        names = {"escape": "../../../../etc/passwd", "absolute": "/etc/passwd", "shard-not-string": 5}
        if how == "index-json":
            (directory / "model.safetensors.index.json").write_text("{not json")
        elif how == "no-weight-map":
            (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
        elif how == "weight-map-list":
            (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
        else:
            _sharded(directory, {key: names[how]})
    else:  # config.json edits
        config = dict(LLAMA_CONFIG)
        text = {"config-list": json.dumps([config]), "config-json": "{model_type: llama",
                "config-string-size": json.dumps({**config, "hidden_size": "16"}),
                "config-zero-layers": json.dumps({**config, "num_hidden_layers": 0}),
                "config-bool-size": json.dumps({**config, "vocab_size": True})}[how]
        (directory / "config.json").write_text(text)


MODEL_CASES = [
    ("truncated", r"model\.safetensors.*(not a readable safetensors file|cannot be read)"),
    ("empty", r"model\.safetensors is not a readable safetensors file"),
    ("garbage", r"model\.safetensors is not a readable safetensors file"),
    ("nan", r"model\.safetensors: tensor 'model\.embed_tokens\.weight' holds 1 NaN or infinite value"),
    ("inf", r"tensor 'model\.norm\.weight' holds 16 NaN or infinite value"),
    ("escape", r"index\.json: the shard of 'model\.embed_tokens\.weight' is '\.\./\.\./\.\./\.\./etc/passwd'; "
               r"shard names must be file names inside the model directory"),
    ("absolute", r"the shard of .* is '/etc/passwd'; shard names must be file names inside"),
    ("shard-not-string", r"the shard of .* is 5; shard names must be"),
    ("index-json", r"index\.json is not valid JSON"),
    ("no-weight-map", r"index\.json: weight_map must map tensor names to shard files"),
    ("weight-map-list", r"weight_map must map tensor names to shard files, got list"),
    ("config-list", r"config\.json must hold a JSON object of settings, got list"),
    ("config-json", r"config\.json is not valid JSON"),
    ("config-string-size", r"config\.json: hidden_size must be a positive integer, got '16'"),
    ("config-zero-layers", r"config\.json: num_hidden_layers must be a positive integer, got 0"),
    ("config-bool-size", r"config\.json: vocab_size must be a positive integer, got True"),
]


@pytest.mark.parametrize("how, expected", MODEL_CASES, ids=[c for c, _ in MODEL_CASES])
def test_damaged_model_files_are_named(tiny_llama_dir, how, expected):  # noqa: F811
    _damage_model(tiny_llama_dir, how)
    with pytest.raises(lowrax.LowraxError, match=expected):
        lowrax.load_pretrained(tiny_llama_dir, progress=False)


@pytest.fixture
def adapter_dir(tiny_llama_dir, tmp_path):  # noqa: F811
    model, params = lowrax.load_pretrained(tiny_llama_dir, progress=False)
    wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), jax.random.key(0),
                          model=model)
    return lowrax.save_peft(wrapped, tmp_path / "adapter", model), model, params


ADAPTER_CASES = [
    ("config-json", lambda d: (d / "adapter_config.json").write_text("{r: 8"), r"adapter_config\.json is not valid JSON"),
    ("config-list", lambda d: (d / "adapter_config.json").write_text("[]"),
     r"adapter_config\.json must hold a JSON object of settings, got list"),
    ("config-bytes", lambda d: (d / "adapter_config.json").write_bytes(b"\xff\xfe{}"), r"adapter_config\.json is not valid JSON"),
    ("r-string", lambda d: _edit_config(d, r="abc"), r"adapter_config\.json: LoraConfig\.r must be an integer >= 1, got 'abc'"),
    ("r-zero", lambda d: _edit_config(d, r=0), r"adapter_config\.json: LoraConfig\.r must be an integer >= 1, got 0"),
    ("alpha-list", lambda d: _edit_config(d, lora_alpha=[8]), r"adapter_config\.json: LoraConfig\.alpha must be"),
    ("dropout", lambda d: _edit_config(d, lora_dropout=2), r"adapter_config\.json: LoraConfig\.dropout must be a number in"),
    ("targets", lambda d: _edit_config(d, target_modules=7), r"adapter_config\.json: LoraConfig\.target_modules must be"),
    ("weights-truncated", lambda d: _truncate(d / "adapter_model.safetensors"),
     r"adapter_model\.safetensors is not a readable safetensors file"),
    ("weights-garbage", lambda d: (d / "adapter_model.safetensors").write_text("hello"),
     r"adapter_model\.safetensors is not a readable safetensors file"),
    ("weights-nan", lambda d: _poison(d / "adapter_model.safetensors"),
     r"adapter_model\.safetensors: tensor '.*lora_A.*' holds \d+ NaN or infinite value"),
]


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def _poison(path):
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key][:] = np.nan
    save_file(tensors, str(path))


@pytest.mark.parametrize("case, damage, expected", ADAPTER_CASES, ids=[c for c, _, _ in ADAPTER_CASES])
def test_damaged_adapter_files_are_named(adapter_dir, case, damage, expected):
    directory, model, params = adapter_dir
    damage(directory)
    with pytest.raises(lowrax.LowraxError, match=expected):
        lowrax.load_peft(params, directory, model)


@pytest.mark.parametrize("missing", ["llama.attention.head_count", "llama.embedding_length",
                                     "llama.feed_forward_length", "llama.block_count"])
def test_gguf_metadata_without_a_required_key_is_named(missing):
    meta = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 16,
            "llama.feed_forward_length": 24, "llama.block_count": 1}
    del meta[missing]
    with pytest.raises(lowrax.NotAModelError, match=rf"GGUF metadata's {missing} is 'missing'"):
        hf_config_from_gguf(meta, set(), 32)
