"""Named LoRA adapters on one base: load / set / disable / delete / extract / save, and
mixed-adapter batches equal to PEFT's `adapter_names=` forward, served by one compiled program."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="named-adapter parity tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="named-adapter parity tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import lowrax  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from lowrax.models.generate import SamplingConfig, _compiled  # noqa: E402
from tests.conftest import hf_model_dir, random_batch  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
# Different ranks, targets and scalings (rsLoRA included), as users' adapters are.
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "c": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "d": dict(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, _ = hf_model_dir(tmp_path_factory, "named-llama",
                           lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)))
    dirs = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        peft_model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **kwargs))
        dirs[name] = tmp_path_factory.mktemp(f"adapter-{name}")
        peft_model.save_pretrained(dirs[name])
    model, params = lowrax.load_pretrained(path, progress=False)
    return path, dirs, model, params


def named(setup, names=("a", "b", "c"), **kwargs):
    _, dirs, model, params = setup
    for name in names:
        params = lowrax.load_peft(params, dirs[name], model, adapter_name=name, **kwargs)
    return params


def logits(model, params, ids, mask, **kwargs):
    return np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask), **kwargs))


def single(setup, name):
    _, dirs, model, params = setup
    return lowrax.load_peft(params, dirs[name], model)


ROWS = ["a", "__base__", "b", "c", "a"]


def test_mixed_batch_equals_peft_and_each_adapter_alone(setup):
    path, dirs, model, params = setup
    ids, mask = random_batch(128, [9, 6, 9, 4, 7], pad_id=0, left=True)
    mixed = logits(model, named(setup), ids, mask, adapter_names=ROWS)

    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, dirs["a"], adapter_name="a").eval()
    for name in ("b", "c"):
        reference.load_adapter(dirs[name], adapter_name=name)
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), adapter_names=ROWS,
                           position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(mixed[valid] - theirs[valid]).max() <= 1e-4

    for row, name in enumerate(ROWS):
        alone = logits(model, params if name == "__base__" else single(setup, name), ids[row:row + 1], mask[row:row + 1])
        np.testing.assert_allclose(mixed[row][valid[row]], alone[0][valid[row]], atol=2e-5, rtol=1e-5)
    # the adapters differ from each other and from the base, so the rows above test something
    assert np.abs(mixed[0] - logits(model, params, ids, mask)[0]).max() > 1e-3


def test_set_disable_delete_and_the_active_adapter(setup):
    _, _, model, params = setup
    ids, mask = random_batch(128, [8, 5], pad_id=0, left=True)
    held = named(setup)
    assert lowrax.adapter_names(held) == ["a", "b", "c"] and lowrax.active_adapter(held) == "a"
    np.testing.assert_allclose(logits(model, held, ids, mask), logits(model, single(setup, "a"), ids, mask), atol=2e-5)
    b = lowrax.set_adapter(held, "b")
    np.testing.assert_allclose(logits(model, b, ids, mask), logits(model, single(setup, "b"), ids, mask), atol=2e-5)
    off = lowrax.disable_adapters(b)
    assert lowrax.active_adapter(off) is None
    np.testing.assert_allclose(logits(model, off, ids, mask), logits(model, params, ids, mask), atol=2e-5)
    # merging takes the active adapter
    np.testing.assert_allclose(logits(model, lowrax.merge(b), ids, mask), logits(model, b, ids, mask), atol=2e-5)

    gone = lowrax.delete_adapter(held, "a")  # the active one: the first remaining becomes active
    assert lowrax.adapter_names(gone) == ["b", "c"] and lowrax.active_adapter(gone) == "b"
    np.testing.assert_allclose(logits(model, gone, ids, mask), logits(model, single(setup, "b"), ids, mask), atol=2e-5)
    with pytest.raises(LowraxError, match="no adapter named 'a'"):
        lowrax.set_adapter(gone, "a")


def test_save_writes_one_named_adapter_as_peft_wrote_it(setup, tmp_path):
    _, dirs, model, _ = setup
    held = named(setup)
    for name in ("b", "c"):
        lowrax.save_peft(held, tmp_path / name, model, adapter_name=name)
        ours, theirs = load_file(str(tmp_path / name / "adapter_model.safetensors")), \
            load_file(str(dirs[name] / "adapter_model.safetensors"))
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            np.testing.assert_array_equal(ours[key], theirs[key])
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config.get("use_rslora", False)) == \
            (ADAPTERS[name]["r"], ADAPTERS[name]["lora_alpha"], ADAPTERS[name].get("use_rslora", False))
    # without a name: the active adapter ("a")
    lowrax.save_peft(held, tmp_path / "active", model)
    assert sorted(load_file(str(tmp_path / "active" / "adapter_model.safetensors"))) == \
        sorted(load_file(str(dirs["a"] / "adapter_model.safetensors")))


def test_an_unnamed_lora_tree_becomes_default_and_extracts_back(setup):
    _, dirs, model, params = setup
    ids, mask = random_batch(128, [6], pad_id=0, left=True)
    one = single(setup, "a")
    both = lowrax.load_peft(one, dirs["b"], model, adapter_name="b")
    assert lowrax.adapter_names(both) == ["default", "b"] and lowrax.active_adapter(both) == "default"
    extracted = lowrax.extract_adapter(both, "b")  # an ordinary LoRA tree: wrap-shaped, trainable
    assert isinstance(extracted["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"], lowrax.LoraKernel)
    assert lowrax.count_params(lowrax.split(extracted)[0]) > 0
    np.testing.assert_allclose(logits(model, extracted, ids, mask), logits(model, single(setup, "b"), ids, mask),
                               atol=1e-6)


def test_mixes_and_loads_into_free_slots_reuse_one_compiled_program(setup):
    _, dirs, model, _ = setup
    held = named(setup, ("a", "b"), capacity=4)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    first = lowrax.generate_ids(model, held, prompts, max_new_tokens=4, adapter_names=["a", "b", "__base__"])
    prefill, step = _compiled(model, SamplingConfig())
    compiled = (prefill._cache_size(), step._cache_size())
    lowrax.generate_ids(model, held, prompts, max_new_tokens=4, adapter_names=["b", "b", "a"])
    lowrax.generate_ids(model, lowrax.set_adapter(held, "b"), prompts, max_new_tokens=4)  # the active one per row
    more = lowrax.load_peft(held, dirs["d"], model, adapter_name="d")  # a free slot, a rank that fits
    with_d = lowrax.generate_ids(model, more, prompts, max_new_tokens=4, adapter_names=["d", "b", "__base__"])
    fewer = lowrax.delete_adapter(more, "a")
    lowrax.generate_ids(model, fewer, prompts, max_new_tokens=4, adapter_names=["d", "__base__", "b"])
    assert (prefill._cache_size(), step._cache_size()) == compiled
    # each row as generated by its adapter alone
    for row, name in ((0, "a"), (1, "b")):
        assert first[row] == lowrax.generate_ids(model, single(setup, name), [prompts[row]], max_new_tokens=4)[0]
    assert with_d[0] == lowrax.generate_ids(model, single(setup, "d"), [prompts[0]], max_new_tokens=4)[0]


def test_named_adapter_errors(setup, tmp_path):
    _, dirs, model, params = setup
    held = named(setup, ("a",))
    ids, mask = random_batch(128, [4, 4], pad_id=0, left=True)
    with pytest.raises(LowraxError, match="already loaded"):
        lowrax.load_peft(held, dirs["a"], model, adapter_name="a")
    with pytest.raises(LowraxError, match="no adapter named 'z'.*loaded: a"):
        model.apply(held, jnp.asarray(ids), jnp.asarray(mask), adapter_names=["a", "z"])
    with pytest.raises(LowraxError, match="2 rows: give one per row"):
        model.apply(held, jnp.asarray(ids), jnp.asarray(mask), adapter_names=["a"])
    with pytest.raises(LowraxError, match="adapter_names needs named adapters"):
        model.apply(params, jnp.asarray(ids), jnp.asarray(mask), adapter_names=["a", "a"])
    with pytest.raises(LowraxError, match="non-empty string other than '__base__'"):
        lowrax.load_peft(params, dirs["a"], model, adapter_name="__base__")
    with pytest.raises(LowraxError, match="hold named adapters.*adapter_name='b'"):
        lowrax.load_peft(held, dirs["b"], model)
    ia3 = lowrax.wrap(params, lowrax.IA3Config(), jax.random.key(0), model.model_type)
    with pytest.raises(LowraxError, match="IA3Kernel.*plain LoRA adapters"):
        lowrax.add_adapter(params, "ia3", ia3)


def test_mixed_batch_on_an_encoder_equals_peft(tmp_path_factory):
    """A BERT classifier: each row's logits with its own adapter, as PEFT's adapter_names gives (the
    head is the checkpoint's, not trained with the adapters: named adapters hold LoRA factors only)."""
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    path, _ = hf_model_dir(tmp_path_factory, "named-bert", lambda: transformers.BertForSequenceClassification(config))
    load = transformers.BertForSequenceClassification.from_pretrained
    dirs = {}
    for i, (name, kwargs) in enumerate((("q", dict(r=2, lora_alpha=4, target_modules=["query", "value"])),
                                        ("ffn", dict(r=4, lora_alpha=4, target_modules=["intermediate.dense", "key"]))),):
        torch.manual_seed(30 + i)
        peft_model = peft.get_peft_model(load(path),
                                         peft.LoraConfig(init_lora_weights=False, **kwargs))
        dirs[name] = tmp_path_factory.mktemp(f"bert-adapter-{name}")
        peft_model.save_pretrained(dirs[name])
    model, params = lowrax.load_pretrained(path, progress=False)
    for name in dirs:
        params = lowrax.load_peft(params, dirs[name], model, adapter_name=name)
    rows = ["ffn", "q", "__base__"]
    ids, mask = random_batch(128, [7, 5, 6], pad_id=0, left=False)
    ours = model.apply(params, jnp.asarray(ids), jnp.asarray(mask), adapter_names=rows)
    reference = peft.PeftModel.from_pretrained(load(path), dirs["q"], adapter_name="q")
    reference.load_adapter(dirs["ffn"], adapter_name="ffn")
    with torch.no_grad():
        theirs = reference.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), adapter_names=rows,
                                  output_hidden_states=True)
    valid = mask.astype(bool)
    hidden = np.asarray(ours.last_hidden_state)
    assert np.abs(hidden[valid] - theirs.hidden_states[-1].numpy()[valid]).max() <= 1e-4
    assert np.abs(np.asarray(ours.logits) - theirs.logits.numpy()).max() <= 1e-4
    base = np.asarray(model.apply(lowrax.base_params(params), jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state)
    assert np.abs(hidden[0] - base[0]).max() > 1e-2 and np.abs(hidden[2] - base[2]).max() < 1e-5


def test_repeated_prompts_keep_their_adapter_in_every_copy(setup):
    _, _, model, _ = setup
    held = named(setup, ("a", "b"), capacity=4)
    prompts, names = [[5, 6, 7], [8, 9]], ["a", "b"]
    shared = lowrax.generate_ids(model, held, prompts, max_new_tokens=4, adapter_names=names, repeats=2)
    each = lowrax.generate_ids(model, held, [p for p in prompts for _ in range(2)], max_new_tokens=4,
                               adapter_names=[n for n in names for _ in range(2)])
    assert shared == each
