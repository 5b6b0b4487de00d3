"""Prompt tuning, P-tuning and prefix tuning: PEFT exchange both ways with equal logits (Llama,
GPT-2, and a BERT classifier), the encoders (MLP, LSTM, prefix projection) against PEFT's own, TEXT init, generation
with virtual tokens in the cache, merge refused, errors, and `lowrax train`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="prompt-learning parity tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="prompt-learning parity tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from lowrax.core.dropout import with_model_dropout  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from tests.conftest import forward, hf_model_dir, random_batch  # noqa: E402
from tests.test_peft_exchange import SMALL, lowrax_outputs  # noqa: E402
from tests.test_training_run import check_exports_and_merge, data_file, overrides, tiny_dir  # noqa: E402,F401

MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
}
V = 3
# (lowrax config, PEFT config) of each case; both sides use the same names.
METHODS = {
    "prompt": (lowrax.PromptTuningConfig(num_virtual_tokens=V), peft.PromptTuningConfig(num_virtual_tokens=V)),
    "p-tuning-mlp": (lowrax.PromptEncoderConfig(num_virtual_tokens=V, encoder_hidden_size=16),
                     peft.PromptEncoderConfig(num_virtual_tokens=V, encoder_hidden_size=16)),
    "p-tuning-lstm": (lowrax.PromptEncoderConfig(num_virtual_tokens=V, encoder_hidden_size=8,
                                                 encoder_reparameterization_type="LSTM"),
                      peft.PromptEncoderConfig(num_virtual_tokens=V, encoder_hidden_size=8,
                                               encoder_reparameterization_type="LSTM")),
    "prefix": (lowrax.PrefixTuningConfig(num_virtual_tokens=V), peft.PrefixTuningConfig(num_virtual_tokens=V)),
    "prefix-projection": (lowrax.PrefixTuningConfig(num_virtual_tokens=V, prefix_projection=True, encoder_hidden_size=16),
                          peft.PrefixTuningConfig(num_virtual_tokens=V, prefix_projection=True, encoder_hidden_size=16)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, tmp_path_factory):
    path, hf = hf_model_dir(tmp_path_factory, f"prompt-{request.param}", MODELS[request.param])
    model, params = lowrax.load_pretrained(path, progress=False)
    return path, hf, model, params


def batch(seed=0):
    """Right-padded: transformers numbers a left-padded row's positions from its padding, lowrax from its first token."""
    return random_batch(128, [7, 4], pad_id=0, left=False, seed=seed)


def peft_logits(peft_model, ids, mask) -> np.ndarray:
    """PEFT's logits for the caller's tokens (prompt tuning returns the virtual tokens' too)."""
    with torch.no_grad():
        out = peft_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    return out[:, -ids.shape[1]:]


def max_difference(model, params, peft_model, ids, mask) -> float:
    valid = mask.astype(bool)
    return float(np.abs(lowrax_outputs(model, params, ids, mask)[valid] - peft_logits(peft_model, ids, mask)[valid]).max())


def peft_config(method):
    return METHODS[method][1].__class__(**{**METHODS[method][1].to_dict(), "task_type": "CAUSAL_LM"})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_lowrax_adapter_loads_in_peft(case, method, tmp_path):
    path, _, model, params = case
    wrapped = lowrax.wrap(params, METHODS[method][0], jax.random.key(1), model=model)
    lowrax.save_peft(wrapped, tmp_path / "adapter", model)
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                                tmp_path / "adapter").eval()
    ids, mask = batch()
    assert max_difference(model, wrapped, peft_model, ids, mask) <= 1e-4
    assert np.abs(lowrax_outputs(model, wrapped, ids, mask) - lowrax_outputs(model, params, ids, mask)).max() > 1e-3


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_adapter_loads_in_lowrax(case, method, tmp_path):
    _, hf, model, params = case
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(hf, peft_config(method)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    wrapped = lowrax.load_peft(params, tmp_path / "adapter", model)
    assert max_difference(model, wrapped, peft_model, *batch(seed=1)) <= 1e-4
    lowrax.save_peft(wrapped, tmp_path / "again", model)
    from safetensors.numpy import load_file

    theirs, ours = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    np.testing.assert_allclose(ours["prompt_embeddings"], theirs["prompt_embeddings"], rtol=0, atol=0)


def linear_from_torch(layer) -> dict:
    return {"kernel": jnp.asarray(layer.weight.detach().numpy().T), "bias": jnp.asarray(layer.bias.detach().numpy())}


@pytest.mark.parametrize("method", ["p-tuning-mlp", "p-tuning-lstm", "prefix-projection"])
def test_encoders_equal_peft_s_given_the_same_weights(case, method):
    """The encoder maths: lowrax's node built from PEFT's encoder weights gives PEFT's output."""
    _, hf, model, params = case
    torch.manual_seed(4)
    peft_model = peft.get_peft_model(hf, peft_config(method)).eval()
    encoder = peft_model.prompt_encoder["default"]
    theirs = peft_model.get_prompt_embedding_to_save("default").detach().numpy()
    table = jnp.asarray(encoder.embedding.weight.detach().numpy())
    if method == "prefix-projection":
        node = lowrax.wrap(params, METHODS[method][0], jax.random.key(0), model=model)["prompt_encoder"]
        node = node.replace(embeddings=table, transform={k: linear_from_torch(encoder.transform[int(k)]) for k in ("0", "2")})
        ours = node.flat()
    else:
        head = {str(i): linear_from_torch(layer) for i, layer in enumerate(encoder.mlp_head) if hasattr(layer, "weight")}
        lstm = None
        if method == "p-tuning-lstm":
            weights, lstm = dict(encoder.lstm_head.named_parameters()), {}
            for name in (f"l{i}{suffix}" for i in range(encoder.lstm_head.num_layers) for suffix in ("", "_reverse")):
                lstm[name] = {"w_ih": jnp.asarray(weights[f"weight_ih_{name}"].detach().numpy().T),
                              "w_hh": jnp.asarray(weights[f"weight_hh_{name}"].detach().numpy().T),
                              "bias": jnp.asarray((weights[f"bias_ih_{name}"] + weights[f"bias_hh_{name}"]).detach().numpy())}
        ours = lowrax.PromptEncoder(embeddings=table, mlp_head=head, lstm_head=lstm).prompt_embeddings()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=1e-5)


def test_text_init_is_peft_s(tiny_dir):  # noqa: F811
    """TEXT init: the text's token embeddings (special tokens included), repeated to the virtual tokens."""
    model, params = lowrax.load_pretrained(tiny_dir, progress=False)
    text = "Classify the date"
    wrapped = lowrax.wrap(params, lowrax.PromptTuningConfig(num_virtual_tokens=11, prompt_tuning_init="TEXT",
                                                            prompt_tuning_init_text=text, tokenizer_name_or_path=str(tiny_dir)),
                          jax.random.key(0), model=model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    peft_model = peft.get_peft_model(hf, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=11, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tiny_dir)))
    theirs = peft_model.prompt_encoder["default"].embedding.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(wrapped["prompt_encoder"].embeddings), theirs)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generation_keeps_the_virtual_tokens_in_the_cache(case, method, tmp_path):
    """Cached greedy decoding equals PEFT's forward, token by token: the virtual tokens (or the
    prefix) sit in the cache's first slots from the prefill on. (PEFT 0.21's own `generate`
    disagrees with its forward here on transformers 5.24, so its forward is the reference.)"""
    _, hf, model, params = case
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(hf, peft_config(method)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    wrapped = lowrax.load_peft(params, tmp_path / "adapter", model)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    ours = lowrax.generate_ids(model, wrapped, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, ours):
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(peft_logits(peft_model, np.array([seq]), np.ones((1, len(seq)), np.int64))[0, -1].argmax()))
        assert got == seq[len(prompt):]


@pytest.fixture(scope="module")
def bert_case(tmp_path_factory):
    path, hf = hf_model_dir(tmp_path_factory, "prompt-bert", lambda: transformers.BertForSequenceClassification(
        transformers.BertConfig(**SMALL, num_labels=3)))
    model, params = lowrax.load_pretrained(path, progress=False)
    return path, hf, model, params


def bert_batch(seed=0):
    return random_batch(128, [7, 4], pad_id=0, left=False, seed=seed)


def peft_classifier_logits(peft_model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return peft_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()


def random_head(params, key=7):
    """A random classifier, so the adapter's effect shows in the class logits (BERT's own head is tiny)."""
    head = params["classifier"]
    k1, k2 = jax.random.split(jax.random.key(key))
    return dict(params, classifier={"kernel": jax.random.normal(k1, head["kernel"].shape),
                                    "bias": jax.random.normal(k2, head["bias"].shape)})


@pytest.mark.parametrize("method", ["prompt", "p-tuning-mlp", "p-tuning-lstm"])
def test_bert_classifier_exchanges_with_peft_both_ways(bert_case, method, tmp_path):
    """PEFT's sequence classification with virtual tokens (the pooler reads the first virtual
    token): lowrax's adapter, with its trained classifier, gives PEFT's class logits, and PEFT's
    adapter gives lowrax the same."""
    path, hf, model, params = bert_case
    cfg = dataclasses.replace(METHODS[method][0], modules_to_save=("classifier",))
    wrapped = lowrax.wrap(random_head(params), cfg, jax.random.key(1), model=model)
    lowrax.save_peft(wrapped, tmp_path / "ours", model)
    auto = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(auto, tmp_path / "ours").eval()
    ids, mask = bert_batch()
    ours = lowrax_outputs(model, wrapped, ids, mask)
    assert np.abs(ours - peft_classifier_logits(peft_model, ids, mask)).max() <= 1e-4
    assert np.abs(ours - lowrax_outputs(model, random_head(params), ids, mask)).max() > 1e-3  # the tokens matter
    out = forward(model)(wrapped, jnp.asarray(ids), jnp.asarray(mask))
    assert out.last_hidden_state.shape[1] == ids.shape[1]  # the caller's tokens only

    torch.manual_seed(3)  # a fresh torch model: PEFT wraps the classifier in place
    theirs = peft.get_peft_model(transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32),
                                 METHODS[method][1].__class__(**{**METHODS[method][1].to_dict(), "task_type": "SEQ_CLS"}))
    theirs.eval().save_pretrained(tmp_path / "theirs")
    loaded = lowrax.load_peft(params, tmp_path / "theirs", model)
    ids, mask = bert_batch(seed=1)
    assert np.abs(lowrax_outputs(model, loaded, ids, mask) - peft_classifier_logits(theirs, ids, mask)).max() <= 1e-4


def test_prefix_tuning_on_bert_is_refused_as_peft_cannot_run_it(bert_case, tmp_path):
    """PEFT 0.21 hands BERT its prefix as past_key_values, which transformers 5's BertModel no
    longer takes (it is `cache` now): PEFT fails, so there is no reference, and lowrax says so."""
    path, _, model, params = bert_case
    peft_model = peft.get_peft_model(transformers.AutoModelForSequenceClassification.from_pretrained(path),
                                     peft.PrefixTuningConfig(num_virtual_tokens=V, task_type="SEQ_CLS"))
    ids, mask = bert_batch()
    with pytest.raises(ValueError, match="past key values"):
        peft_classifier_logits(peft_model, ids, mask)
    with pytest.raises(LowraxError, match="prefix tuning on BERT"):
        lowrax.wrap(params, lowrax.PrefixTuningConfig(num_virtual_tokens=V), jax.random.key(0), model=model)


@pytest.mark.parametrize("method", ["prompt", "p-tuning-mlp"])
def test_virtual_tokens_computed_once_equal_every_row_s_own(tmp_path_factory, monkeypatch, method):
    """The virtual tokens' keys and values, computed once for the batch, give the logits and gradients of
    running them in every row (the path a model with dropout takes in training)."""
    build = lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(  # noqa: E731
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    path, _ = hf_model_dir(tmp_path_factory, "prompt-gpt2-no-dropout", build)
    model, params = lowrax.load_pretrained(path, progress=False)
    trainable, frozen = lowrax.split(lowrax.wrap(params, METHODS[method][0], jax.random.key(1), model=model))
    ids, mask = batch()

    def loss(trainable, key=None):
        tree = lowrax.combine(trainable, frozen)
        tree = tree if key is None else with_model_dropout(tree, key)
        return jnp.sum(jnp.sin(model.apply(tree, jnp.asarray(ids), jnp.asarray(mask))) * mask[..., None])

    once = jax.value_and_grad(loss)(trainable)
    monkeypatch.setattr(type(model), "has_dropout", lambda self: True)  # rates stay 0: only the path changes
    every_row = jax.value_and_grad(loss)(trainable, jax.random.key(2))
    for got, want in zip(jax.tree.leaves(once), jax.tree.leaves(every_row)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_merge_is_refused_and_only_the_prompt_trains(case):
    _, _, model, params = case
    wrapped = lowrax.wrap(params, METHODS["p-tuning-mlp"][0], jax.random.key(0), model=model)
    trainable, _ = lowrax.split(wrapped)
    assert set(jax.tree.leaves(lowrax.labels(trainable))) == {"prompt"}
    with pytest.raises(LowraxError, match="P_TUNING adapters add virtual tokens to the input .* cannot be merged"):
        lowrax.merge(wrapped)


def test_errors_name_the_problem(case, tmp_path):
    path, _, model, params = case
    with pytest.raises(LowraxError, match="prompt_tuning needs the model for its dimensions"):
        lowrax.wrap(params, lowrax.PromptTuningConfig(), jax.random.key(0), model.model_type)
    with pytest.raises(LowraxError, match="num_virtual_tokens must be an integer >= 1, got 0"):
        lowrax.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(LowraxError, match="prompt_tuning_init='TEXT' needs prompt_tuning_init_text"):
        lowrax.PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(LowraxError, match="encoder_reparameterization_type must be one of MLP, LSTM, got 'GRU'"):
        lowrax.PromptEncoderConfig(encoder_reparameterization_type="GRU")
    wrapped = lowrax.wrap(params, lowrax.PrefixTuningConfig(num_virtual_tokens=2), jax.random.key(0), model=model)
    ids, mask = batch()
    with pytest.raises(LowraxError, match="packed sequences .* cannot carry PREFIX_TUNING's virtual tokens"):
        forward(model)(wrapped, ids, mask, segment_ids=mask)
    lowrax.save_peft(wrapped, tmp_path / "a", model)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 5}))
    with pytest.raises(lowrax.CheckpointError, match=r"prompt_embeddings has shape \(2, \d+\), expected \(5, "):
        lowrax.load_peft(params, tmp_path / "a", model)


@pytest.mark.parametrize("method,settings", [("prompt_tuning", ["prompt_tuning.num_virtual_tokens=4"]),
                                             ("prefix_tuning", ["prefix_tuning.num_virtual_tokens=4"])])
def test_lowrax_train_exports_and_imports(tiny_dir, data_file, tmp_path, method, settings):  # noqa: F811
    from lowrax.cli import main

    run = tmp_path / "run"
    items = [i for i in overrides(tiny_dir, data_file, run, 3) if not i.startswith("lora.")]
    assert main(["train", *items, f"method={method}", "optim.learning_rate=0.05", *settings]) == 0
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == method.upper()
    check_exports_and_merge(run, tiny_dir, tmp_path, merges=False)
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "imported"), "--model", str(tiny_dir)]) == 0
    assert main(["export-peft", str(tmp_path / "imported"), str(tmp_path / "peft2")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == (tmp_path / "peft2" / "adapter_model.safetensors").read_bytes()
    assert main(["generate", "--adapter", str(run), "--model", str(tiny_dir), "--max-new-tokens", "3", "hello"]) == 0
