"""`lowrax generate --adapter a=DIR --adapter b=DIR --prompt-adapters ...` and `lowrax merge-adapters`
on a tiny Llama that carries MiniLM's tokenizer (so text goes in and out, no torch needed)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lowrax
from lowrax.cli.main import COMBINATION_TYPES, main
from lowrax.merging.combine_adapters import COMBINATION_TYPES as LIBRARY_TYPES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, {name: PEFT adapter dir}) for a 1-layer Llama over MiniLM's 30522-token vocabulary."""
    minilm = lowrax.embedded_minilm_path()
    config = {"model_type": "llama", "vocab_size": 30522, "hidden_size": 16, "intermediate_size": 24,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 64, "tie_word_embeddings": True}
    root = tmp_path_factory.mktemp("tiny-text-llama")
    from lowrax.models import model_from_hf_config

    rng = np.random.default_rng(0)
    tensors = {t.hf_key: rng.normal(size=t.hf_shape).astype(np.float32) for t in model_from_hf_config(config).tensors()}
    (root / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, root / name)
    model, params = lowrax.load_pretrained(root, progress=False)
    adapters = {}
    for i, (name, targets) in enumerate((("a", ("q_proj", "v_proj")), ("b", ("q_proj", "o_proj", "up_proj")))):
        wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=2, alpha=4, target_modules=targets), jax.random.key(i),
                              model.model_type)
        trainable, frozen = lowrax.split(wrapped)
        trainable = jax.tree.map(lambda x: x + 3.0, trainable)  # B nonzero and large: outputs change visibly
        adapters[name] = lowrax.save_peft(lowrax.combine(trainable, frozen), root / f"adapter-{name}", model,
                                          base_model=str(root))
    return root, adapters


def test_generate_gives_each_prompt_its_adapter(tiny, capsys):
    root, adapters = tiny
    prompts = ["the cat sat", "a dog ran", "birds fly"]
    assert main(["generate", "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
                 "--prompt-adapters", "a,b,__base__", "--max-new-tokens", "5", "--chat", "off", *prompts]) == 0
    printed = capsys.readouterr().out
    model, params = lowrax.load_pretrained(root, progress=False)
    tokenizer = lowrax.load_tokenizer(root)
    for prompt, name in zip(prompts, ["a", "b", "__base__"]):
        one = params if name == "__base__" else lowrax.load_peft(params, adapters[name], model)
        alone = lowrax.generate(model, one, tokenizer, prompt, max_new_tokens=5, chat=False)[0]
        assert f">>> {prompt}  [{name}]\n{alone}\n" in printed
    # the adapters do change what is generated, so the check above can fail
    outputs = {name: lowrax.generate(model, lowrax.load_peft(params, adapters[name], model), tokenizer, prompts[0],
                                     max_new_tokens=5, chat=False)[0] for name in ("a", "b")}
    assert outputs["a"] != outputs["b"]


def test_generate_refuses_bad_adapter_lists(tiny, capsys):
    _, adapters = tiny
    named = ["--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}"]
    assert main(["generate", *named, "--prompt-adapters", "a", "p1", "p2"]) == 2
    assert "names 1 adapter(s) for 2 prompt(s)" in capsys.readouterr().err
    assert main(["generate", *named, "--prompt-adapters", "a,zz", "p1", "p2"]) == 2
    assert "no adapter named 'zz'" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(adapters["a"]), "--adapter", str(adapters["b"]), "p1"]) == 2
    assert "several --adapter need names" in capsys.readouterr().err
    assert main(["generate", "--adapter", f"a={adapters['a']}", "--adapter", f"a={adapters['b']}", "p1"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_merge_adapters_writes_what_combine_adapters_gives(tiny, tmp_path, capsys):
    root, adapters = tiny
    assert main(["merge-adapters", str(tmp_path / "ab"), "--adapter", f"a={adapters['a']}", "--adapter",
                 f"b={adapters['b']}", "--weights", "0.7", "0.3", "--combination-type", "ties_svd", "--density", "0.5",
                 "--svd-rank", "3"]) == 0
    assert "ties_svd of a, b" in capsys.readouterr().out
    model, params = lowrax.load_pretrained(root, progress=False)
    for name in ("a", "b"):
        params = lowrax.load_peft(params, adapters[name], model, adapter_name=name)
    expected = lowrax.combine_adapters(params, ["a", "b"], [0.7, 0.3], "ab", "ties_svd", svd_rank=3, density=0.5)
    lowrax.save_peft(expected, tmp_path / "expected", model, adapter_name="ab")
    ours, theirs = load_file(str(tmp_path / "ab" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "expected" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 4  # q, o, up and v
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-6)
    assert json.loads((tmp_path / "ab" / "adapter_config.json").read_text())["r"] == 3
    assert main(["merge-adapters", str(tmp_path / "x"), "--adapter", f"a={adapters['a']}", "--adapter",
                 f"b={adapters['b']}", "--weights", "1", "--combination-type", "cat"]) == 2
    assert "1 weight(s) for 2 adapter(s)" in capsys.readouterr().err


def test_unequal_ranks_are_refused_before_the_base_loads(tiny, tmp_path, capsys, monkeypatch):
    root, adapters = tiny
    wider = tmp_path / "adapter-c"
    shutil.copytree(adapters["a"], wider)
    config = json.loads((wider / "adapter_config.json").read_text())
    (wider / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    from lowrax.train import adapter_sets

    def no_loading(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(adapter_sets, "load_pretrained", no_loading)
    assert main(["merge-adapters", str(tmp_path / "out"), "--adapter", f"a={adapters['a']}", "--adapter", f"c={wider}",
                 "--weights", "0.5", "0.5", "--combination-type", "linear"]) == 2
    assert "same r value when using combination_type linear (ranks: {'a': 2, 'c': 4})" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_cli_lists_every_combination_type():
    assert sorted(COMBINATION_TYPES) == sorted(LIBRARY_TYPES)
