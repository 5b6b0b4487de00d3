"""The T5 family against transformers (random small configs, float32): logits, relative position
buckets, cached generation, saving, LoRA / IA3 exchange with PEFT, and seq2seq training."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="T5 parity tests need the torch reference (pip install -e .[test])")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="T5 exchange tests need peft (pip install -e .[test])")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from lowrax.models.t5 import relative_bucket_table  # noqa: E402
from tests.conftest import forward, hf_model_dir, random_batch, tiny_t5_dir  # noqa: E402
from tests.test_peft_exchange import randomize  # noqa: E402

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
             pad_token_id=0, eos_token_id=1)

CONFIGS = {
    # Flan-T5 / v1.1: gated GELU, a head of its own, no output scaling
    "flan": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # T5 v1.0: ReLU, the head tied to the shared embedding, decoder output scaled by d_model**-0.5
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}


def build(name):
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**SMALL, **CONFIGS[name]))
    if name == "flan":  # transformers 5 ties at construction; a v1.1 file carries its own head
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, SMALL["d_model"]))
    return hf


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path, hf = hf_model_dir(tmp_path_factory, f"t5-{request.param}", lambda: build(request.param))
    model, params = lowrax.load_pretrained(path, progress=False)
    return path, hf, model, params


def inputs(seed=0):
    ids, mask = random_batch(VOCAB, [30, 17, 4], pad_id=0, left=False, seed=seed)
    decoder_ids, _ = random_batch(VOCAB, [25, 25, 25], pad_id=0, left=False, seed=seed + 1)
    decoder_ids[:, 0] = 0  # the start token
    return ids, mask, decoder_ids


def torch_logits(hf, ids, mask, decoder_ids):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()


def ours(model, params, ids, mask, decoder_ids):
    return np.asarray(forward(model)(params, jnp.asarray(ids), jnp.asarray(mask), decoder_input_ids=jnp.asarray(decoder_ids)))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 20)])
def test_relative_buckets_equal_transformers(bidirectional, buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-3 * distance, 3 * distance + 1)
    expected = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance).numpy()
    table = relative_bucket_table(bidirectional, buckets, distance)
    np.testing.assert_array_equal(table[np.clip(relative.numpy(), -distance, distance) + distance], expected)


def test_logits_match_transformers(pair):
    _, hf, model, params = pair
    ids, mask, decoder_ids = inputs()
    ref = torch_logits(hf, ids, mask, decoder_ids)
    got = ours(model, params, ids, mask, decoder_ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4
    # the config decides the head: v1.0 scales a tied head, Flan-T5 has its own
    assert ("lm_head" in params) == (model.config.hf.get("scale_decoder_outputs") is False)


def test_cached_generation_matches_full_forward_and_transformers(pair):
    _, hf, model, params = pair
    prompts = [[5, 9, 17, 3, 1], [40, 2, 7, 33, 12, 60, 1]]
    new = lowrax.generate_ids(model, params, prompts, max_new_tokens=6, eos_token_ids=[])
    for prompt, continuation in zip(prompts, new):
        # One causal decoder pass over start + continuation holds every step's full-forward logits.
        decoded = [model.config.decoder_start_token_id] + list(continuation)
        logits = ours(model, params, [prompt], np.ones((1, len(prompt)), np.int64), [decoded[:-1]])
        assert [int(t) for t in logits[0].argmax(-1)] == list(continuation)
        with torch.no_grad():  # (transformers' own cache breaks with a deeper decoder than encoder)
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, num_beams=1,
                              use_cache=False, eos_token_id=None)[0, 1:].tolist()
        assert continuation == ref


def test_saved_model_loads_in_transformers(pair, tmp_path):
    _, hf, model, params = pair
    lowrax.save_pretrained(params, model, tmp_path / "saved")
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    ids, mask, decoder_ids = inputs(seed=4)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask, decoder_ids), torch_logits(hf, ids, mask, decoder_ids),
                               atol=1e-6)


def test_apply_without_decoder_input_names_it(pair):
    _, _, model, params = pair
    with pytest.raises(LowraxError, match="decoder_input_ids"):
        forward(model)(params, jnp.ones((1, 3), jnp.int32))



# lowrax config, PEFT config: every T5 projection PEFT names, and PEFT's defaults
EXCHANGES = {
    "lora-all": (lowrax.LoraConfig(r=4, alpha=8, target_modules=("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")),
                 lambda wi: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "v", "o", *wi, "wo"],
                                            init_lora_weights=False, task_type="SEQ_2_SEQ_LM")),
    "lora-defaults": (lowrax.LoraConfig(r=4, alpha=8),
                      lambda wi: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="SEQ_2_SEQ_LM")),
    "ia3-defaults": (lowrax.IA3Config(), lambda wi: peft.IA3Config(init_ia3_weights=False, task_type="SEQ_2_SEQ_LM")),
}


@pytest.mark.parametrize("exchange", sorted(EXCHANGES))
def test_adapters_cross_with_peft_both_ways(pair, exchange, tmp_path):
    path, hf, model, params = pair
    ours_cfg, theirs = EXCHANGES[exchange]
    ids, mask, decoder_ids = inputs(seed=2)
    # lowrax -> PEFT
    wrapped = randomize(lowrax.wrap(params, ours_cfg, jax.random.key(1), model=model), jax.random.key(2))
    lowrax.save_peft(wrapped, tmp_path / "ours", model)
    base = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    got = ours(model, wrapped, ids, mask, decoder_ids)
    assert np.abs(got - torch_logits(loaded, ids, mask, decoder_ids)).max() <= 1e-4
    assert np.abs(got - ours(model, params, ids, mask, decoder_ids)).max() > 1e-3  # the adapter changes the model
    # PEFT -> lowrax
    torch.manual_seed(3)
    wi = ["wi_0", "wi_1"] if model.config.gated else ["wi"]
    theirs_model = peft.get_peft_model(transformers.T5ForConditionalGeneration.from_pretrained(path), theirs(wi)).eval()
    theirs_model.save_pretrained(tmp_path / "theirs")
    back = lowrax.load_peft(params, tmp_path / "theirs", model)
    # (all-linear LoRA with random factors gives logits near 20: float32 rounding grows with them)
    np.testing.assert_allclose(ours(model, back, ids, mask, decoder_ids), torch_logits(theirs_model, ids, mask, decoder_ids),
                               atol=1e-4, rtol=1e-5)


def test_seq2seq_training_run(tmp_path_factory, tmp_path):
    """`lowrax train model.task=seq2seq`: input/target records, loss on the target, the exact-match metric
    from cached generation, a PEFT adapter out."""
    from lowrax.train.config import load_config
    from lowrax.train.trainer import run_training

    path = tiny_t5_dir(tmp_path_factory)
    records = [{"input": f"copy {w}", "target": w} for w in ["alpha", "beta", "gamma", "delta"] * 8]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(None, [f"model.path={path}", "model.task=seq2seq", f"data.source={tmp_path / 'data.jsonl'}",
                             f"train.output_dir={tmp_path / 'run'}", "train.steps=12", "train.batch_size=8",
                             "data.seq_len=16", "data.target_len=8", "lora.target_modules=all-linear",
                             "optim.learning_rate=1e-2", "train.eval_examples=4", "train.samples=0"])
    summary = run_training(cfg, progress=False, log=lambda *_: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0] - 1.0
    assert summary["metric"] == "exact_match" and summary["metric_after"] is not None
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"


def test_seq2seq_batches_train_on_the_target_and_its_eos():
    from lowrax.train.config import DataSection
    from lowrax.train.data import Batches, encode_all

    class Tok:  # one id per word, EOS 2, like a tokenizer that does not append EOS itself
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [10 + len(w) for w in text.split()]}

    records = [{"input": "a bb ccc", "target": "dddd e"}, {"input": "ff", "target": "g hh iii jjjj kkkkk"}]
    data = encode_all(Tok(), records, DataSection(), "seq2seq")
    assert data.targets == [[14, 11, 2], [11, 12, 13, 14, 15, 2]]
    batch = Batches(data, seq_len=4, batch_size=2, seed=0, target_len=4).rows_batch([[0], [1]])
    np.testing.assert_array_equal(batch["input_ids"], [[11, 12, 13, 0], [12, 0, 0, 0]])
    np.testing.assert_array_equal(batch["labels"], [[14, 11, 2, 0], [11, 12, 13, 14]])  # truncated to target_len
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(LowraxError, match="input, target"):
        encode_all(Tok(), [{"text": "x"}], DataSection(format="seq2seq"), "seq2seq")


def test_task_and_model_kind_must_agree(tmp_path_factory, tmp_path):
    from lowrax.train.build import build_model
    from lowrax.train.config import load_config

    path = tiny_t5_dir(tmp_path_factory)
    with pytest.raises(LowraxError, match="model.task=seq2seq"):
        build_model(load_config(None, [f"model.path={path}"]))
    with pytest.raises(LowraxError, match="encoder-decoder"):
        build_model(load_config(None, ["model.task=seq2seq"]))


def test_bfloat16_base_with_float32_lora(pair):
    _, _, model, params = pair
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ids, mask, decoder_ids = inputs(seed=5)
    ref = ours(model, params, ids, mask, decoder_ids)
    got = forward(model)(bf16, jnp.asarray(ids), jnp.asarray(mask), decoder_input_ids=jnp.asarray(decoder_ids))
    assert got.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got, np.float32) - ref).max() <= 0.05 * np.abs(ref).max()
    wrapped = lowrax.wrap(bf16, lowrax.LoraConfig(r=4, target_modules="all-linear", init="random"), jax.random.key(0))
    trainable, frozen = lowrax.split(wrapped)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(decoder_ids),
             "loss_mask": jnp.ones(decoder_ids.shape, jnp.int32)}
    from lowrax.train.step import seq2seq_loss

    grads = jax.tree.leaves(jax.jit(jax.grad(lambda t: seq2seq_loss(model, lowrax.combine(t, frozen), batch)[0]))(trainable))
    assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all() for g in grads)
    assert max(float(jnp.abs(g).max()) for g in grads) > 0


def test_methods_without_a_t5_placement_are_refused(pair):
    _, _, model, params = pair
    with pytest.raises(LowraxError, match="bottleneck adapters are implemented for"):
        lowrax.wrap(params, lowrax.BottleneckConfig(), jax.random.key(0), model=model)
    with pytest.raises(LowraxError, match="prompt-learning methods run on causal LMs and BERT encoders, not 't5'"):
        lowrax.wrap(params, lowrax.PromptTuningConfig(num_virtual_tokens=4), jax.random.key(0), model=model)


def test_peft_t5_adapter_imports_as_a_seq2seq_run(tmp_path_factory, tmp_path):
    """`lowrax import-peft` of a PEFT SEQ_2_SEQ_LM adapter gives a run with model.task=seq2seq that restores."""
    from lowrax.train.runs import import_peft, restore_run

    path = tiny_t5_dir(tmp_path_factory)
    model, params = lowrax.load_pretrained(path, progress=False)
    wrapped = randomize(lowrax.wrap(params, lowrax.LoraConfig(r=2, alpha=4), jax.random.key(1), model=model),
                        jax.random.key(2))
    lowrax.save_peft(wrapped, tmp_path / "adapter", model)
    run = import_peft(tmp_path / "adapter", tmp_path / "run", model_path=str(path))
    cfg, restored_model, restored = restore_run(run)
    assert cfg.model.task == "seq2seq" and restored_model.is_seq2seq
    ids, mask, decoder_ids = inputs()
    ids, decoder_ids = ids % 1000, decoder_ids % 1000
    np.testing.assert_allclose(ours(model, restored, ids, mask, decoder_ids), ours(model, wrapped, ids, mask, decoder_ids),
                               atol=1e-6)


def test_pruning_refuses_an_encoder_decoder(pair):
    _, _, model, params = pair
    for method, ids in (("wanda", np.ones((2, 8), np.int32)), ("magnitude", None)):
        with pytest.raises(LowraxError, match="t5 is not supported"):
            lowrax.prune(params, model, ids, method=method, progress=False)
