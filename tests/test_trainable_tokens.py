"""Trainable tokens: the standalone method (PEFT's TRAINABLE_TOKENS) and LoRA's trainable_token_indices,
each exchanged with PEFT both ways with equal logits on a tied Llama (the head sees the trained rows), an
untied Llama, GPT-2 (tied) and a BERT classifier; only the chosen rows saved; config errors; merging and
unmerging; `lowrax train` with both forms."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PEFT exchange tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="PEFT exchange tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import lowrax  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from tests.conftest import hf_model_dir, random_batch  # noqa: E402
from tests.test_ia3 import max_difference  # noqa: E402
from tests.test_peft_exchange import lowrax_outputs, perturb_peft, randomize  # noqa: E402
from tests.test_training_run import check_method_run, data_file, tiny_dir  # noqa: E402,F401

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
FAMILIES = {
    "llama_tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=True)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=False)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4)),
    "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        num_labels=3)),
}
TOKENS = [2, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89]
LORA_TARGETS = {"llama_tied": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
                "bert": ["query", "value"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            path, _ = hf_model_dir(tmp_path_factory, family, FAMILIES[family])
            cache[family] = (path, *lowrax.load_pretrained(path, progress=False))
        return cache[family]

    return get


def fresh_torch_model(path, model):
    auto = transformers.AutoModelForCausalLM if model.is_causal_lm else transformers.AutoModelForSequenceClassification
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def difference(model, params, torch_model) -> float:
    ids, mask = random_batch(96, [9, 6], pad_id=0, left=model.is_causal_lm, seed=3)
    return max_difference(model, params, torch_model, ids, mask)


def peft_config(family: str, form: str):
    extra = {"fan_in_fan_out": True} if family == "gpt2" else {}
    head = {"modules_to_save": ["classifier"]} if family == "bert" else {}  # the classifier trains with it
    if form == "alone":
        return peft.TrainableTokensConfig(token_indices=TOKENS, init_weights=False)  # (it has no modules_to_save)
    return peft.LoraConfig(r=2, target_modules=LORA_TARGETS[family], init_lora_weights=False,
                           trainable_token_indices=TOKENS, **extra, **head)


def lowrax_config(family: str, form: str):
    head = {"modules_to_save": ("classifier",)} if family == "bert" else {}
    if form == "alone":
        return lowrax.TrainableTokensConfig(token_indices=tuple(TOKENS))
    return lowrax.LoraConfig(r=2, target_modules=tuple(LORA_TARGETS[family]), trainable_token_indices=tuple(TOKENS),
                             **head)


CASES = [(family, form) for family in FAMILIES for form in ("alone", "lora")]


@pytest.mark.parametrize("family, form", CASES)
def test_peft_adapter_loads_in_lowrax_with_equal_logits(saved, family, form, tmp_path):
    path, model, params = saved(family)
    torch.manual_seed(0)
    peft_model = perturb_peft(peft.get_peft_model(fresh_torch_model(path, model), peft_config(family, form)), 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = lowrax.load_peft(params, tmp_path / "adapter", model)
    assert difference(model, loaded, peft_model) <= 1e-4
    assert difference(model, params, peft_model) > 1e-3  # the adapter acts: 10x the tolerance


@pytest.mark.parametrize("family, form", CASES)
def test_lowrax_adapter_loads_in_peft_with_equal_logits(saved, family, form, tmp_path):
    path, model, params = saved(family)
    trained = randomize(lowrax.wrap(params, lowrax_config(family, form), jax.random.key(1), model=model),
                        jax.random.key(2))
    lowrax.save_peft(trained, tmp_path / "adapter", model)
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    rows = [v for k, v in tensors.items() if "trainable_tokens_delta" in k]
    assert rows and all(v.shape == (len(TOKENS), 32) for v in rows)  # only the chosen rows are saved
    peft_model = peft.PeftModel.from_pretrained(fresh_torch_model(path, model), tmp_path / "adapter").eval()
    assert difference(model, trained, peft_model) <= 1e-4
    assert difference(model, params, peft_model) > 1e-3


def test_the_tied_head_sees_the_trained_rows_and_merging_keeps_them(saved):
    _, model, params = saved("llama_tied")
    trained = randomize(lowrax.wrap(params, lowrax.TrainableTokensConfig(token_indices=(5, 7)), jax.random.key(1),
                                    model=model), jax.random.key(2))
    ids, mask = random_batch(96, [6], pad_id=0, left=True, seed=1)
    ids[:, :] = 3  # none of the trained tokens in the input: only the tied head can show the change
    before, after = lowrax_outputs(model, params, ids, mask), lowrax_outputs(model, trained, ids, mask)
    changed = np.abs(after - before).max(axis=(0, 1))
    assert changed[[5, 7]].min() > 1e-3 and np.delete(changed, [5, 7]).max() == 0.0
    merged = lowrax.merge(trained)
    np.testing.assert_allclose(lowrax_outputs(model, merged, ids, mask), after, atol=1e-5)
    again = lowrax.unmerge(merged, trained)
    node = again["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(np.asarray(node.rows), np.asarray(trained["model"]["embed_tokens"]["embedding"].rows))


def test_only_the_rows_train(saved):
    _, model, params = saved("llama")
    wrapped = lowrax.wrap(params, lowrax.TrainableTokensConfig(token_indices=(5, 7, 9)), jax.random.key(1), model=model)
    trainable, _ = lowrax.split(wrapped)
    assert [x.shape for x in jax.tree.leaves(trainable)] == [(3, 32)]


def test_bad_settings_are_named():
    with pytest.raises(LowraxError, match=r"TrainableTokensConfig.token_indices must be a non-empty list of token ids"):
        lowrax.TrainableTokensConfig()
    with pytest.raises(LowraxError, match="without repeats"):
        lowrax.TrainableTokensConfig(token_indices=(3, 3))
    with pytest.raises(LowraxError, match="LoraConfig.trainable_token_indices must be token ids, or a mapping"):
        lowrax.LoraConfig(trainable_token_indices={"embed_tokens": "all"})


def test_out_of_vocabulary_ids_and_unknown_tables_are_named(saved):
    _, model, params = saved("llama")
    with pytest.raises(LowraxError, match="below model.embed_tokens's vocabulary size 96; got 500"):
        lowrax.wrap(params, lowrax.TrainableTokensConfig(token_indices=(1, 500)), jax.random.key(0), model=model)
    with pytest.raises(LowraxError, match="'wte', which matches no embedding tables"):
        lowrax.wrap(params, lowrax.LoraConfig(trainable_token_indices={"wte": [1]}), jax.random.key(0), model=model)


def test_a_lowrax_lora_with_token_rows_writes_peft_s_list_form(saved, tmp_path):
    _, model, params = saved("llama_tied")
    wrapped = lowrax.wrap(params, lowrax_config("llama_tied", "lora"), jax.random.key(1), model=model)
    lowrax.save_peft(wrapped, tmp_path / "adapter", model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == TOKENS
    with pytest.raises(LowraxError, match="beside LoRA only"):
        rows = lowrax.wrap(params, lowrax.TrainableTokensConfig(token_indices=(1,)), jax.random.key(0), model=model)
        lowrax.save_peft(lowrax.wrap(rows, lowrax.IA3Config(), jax.random.key(0), model=model), tmp_path / "x", model)


def test_lowrax_train_then_export_and_import(tiny_dir, data_file, tmp_path):  # noqa: F811
    check_method_run(tiny_dir, data_file, tmp_path, "trainable_tokens", ["trainable_tokens.token_indices=[3,5,7]"],
                     full=False, targets=None)


def test_lowrax_train_lora_with_token_rows_then_export_and_import(tiny_dir, data_file, tmp_path):  # noqa: F811
    check_method_run(tiny_dir, data_file, tmp_path, "lora", ["lora.r=2", "lora.trainable_token_indices=[3,5,7]"],
                     full=False, peft_type="LORA")
