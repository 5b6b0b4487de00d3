"""BERT-style encoders against transformers: random small configs and the embedded MiniLM."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the torch reference (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from tests.conftest import forward, hf_model_dir, random_batch  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)

BUILDERS = {
    "bert": lambda: transformers.BertModel(transformers.BertConfig(**SMALL)),
    "bert-classifier": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3)),
    "roberta": lambda: transformers.RobertaModel(transformers.RobertaConfig(**SMALL, pad_token_id=1)),
    "roberta-classifier": lambda: transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(**SMALL, pad_token_id=1, num_labels=2)),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request, tmp_path_factory):
    path, hf = hf_model_dir(tmp_path_factory, request.param, BUILDERS[request.param])
    model, params = lowrax.load_pretrained(path, progress=False)
    return hf, model, params


def run_reference(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


@pytest.mark.parametrize("lengths", [[8], [12, 5], [3, 10, 7]])
def test_outputs_match_transformers(pair, lengths):
    hf, model, params = pair
    ids, mask = random_batch(model.config.vocab_size, lengths, pad_id=model.config.pad_token_id, left=False)
    ours = forward(model)(params, jnp.asarray(ids), jnp.asarray(mask))
    ref = run_reference(hf, ids, mask)
    valid = mask.astype(bool)
    if hasattr(ref, "logits"):
        assert ours.logits.shape == ref.logits.shape
        assert np.abs(np.asarray(ours.logits) - ref.logits.numpy()).max() <= 1e-4
    else:
        hidden = np.asarray(ours.last_hidden_state)
        assert np.abs(hidden[valid] - ref.last_hidden_state.numpy()[valid]).max() <= 1e-4
        assert np.abs(np.asarray(ours.pooler_output) - ref.pooler_output.numpy()).max() <= 1e-4


def test_minilm_hidden_states_match_transformers():
    path = lowrax.embedded_minilm_path()
    model, params = lowrax.load_pretrained(path, progress=False)
    tokenizer = lowrax.load_tokenizer(path)
    batch = tokenizer(["lowrax fine-tunes transformers in JAX.", "A short one."], padding=True, return_tensors="np")
    ours = forward(model)(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                       jnp.asarray(batch["token_type_ids"]))
    hf = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in batch.items()})
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(ours.last_hidden_state)[valid] - ref.last_hidden_state.numpy()[valid]).max() <= 1e-4
    assert np.abs(np.asarray(ours.pooler_output) - ref.pooler_output.numpy()).max() <= 1e-4


def test_encoder_save_round_trips(pair, tmp_path):
    hf, model, params = pair
    out = lowrax.save_pretrained(params, model, tmp_path / "saved")
    reloaded = type(hf).from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = random_batch(model.config.vocab_size, [6, 9], pad_id=model.config.pad_token_id, left=False)
    ref, again = run_reference(hf, ids, mask), run_reference(reloaded, ids, mask)
    assert all(torch.equal(ref[k], again[k]) for k in ref.keys())
