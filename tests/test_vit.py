"""ViT against transformers (random small configs, float32): logits, transformers-4 names, the image
processor, LoRA + classifier exchange with PEFT, and image-folder training in `lowrax train`."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="ViT parity tests need the torch reference (pip install -e .[test])")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="ViT exchange tests need peft (pip install -e .[test])")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import lowrax  # noqa: E402
from tests.test_peft_exchange import randomize  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from lowrax.models.vit import ViTModel  # noqa: E402
from tests.conftest import forward  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
             patch_size=4)
CONFIGS = {"qkv-bias": dict(num_labels=3), "no-qkv-bias": dict(num_labels=2, qkv_bias=False, hidden_act="gelu_new")}
V5_TO_V4 = (("vit.layers.", "vit.encoder.layer."), ("attention.q_proj", "attention.attention.query"),
            ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
            ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"))


def v5_name(key: str) -> str:
    """A transformers-4 ViT key under transformers 5's module names."""
    for new, old in V5_TO_V4:
        key = key.replace(old, new)
    return key


def v4_name(key: str) -> str:
    """A transformers-5 ViT key as transformers 4 wrote it."""
    for new, old in V5_TO_V4:
        key = key.replace(new, old)
    return key


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, **CONFIGS[request.param])).eval()
    path = tmp_path_factory.mktemp(f"vit-{request.param}")
    hf.save_pretrained(path)
    model, params = lowrax.load_pretrained(path, progress=False)
    return path, hf, model, params


def pixels(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


def torch_logits(hf, x):
    with torch.no_grad():
        return hf(pixel_values=torch.tensor(x)).logits.numpy()


def ours(model, params, x):
    return np.asarray(forward(model)(params, jnp.asarray(x)).logits)


def test_logits_match_transformers(pair):
    _, hf, model, params = pair
    x = pixels()
    assert np.abs(ours(model, params, x) - torch_logits(hf, x)).max() <= 1e-4


def test_bare_vit_model_hidden_states_and_pooler(tmp_path):
    torch.manual_seed(1)
    hf = transformers.ViTModel(transformers.ViTConfig(**SMALL)).eval()  # keys without "vit.", with a pooler
    hf.save_pretrained(tmp_path)
    model, params = lowrax.load_pretrained(tmp_path, progress=False)
    x = pixels(2, seed=1)
    out = forward(model)(params, jnp.asarray(x))
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(x))
    assert np.abs(np.asarray(out.last_hidden_state) - ref.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(out.pooler_output) - ref.pooler_output.numpy()).max() <= 1e-4
    assert out.logits is None


def test_checkpoints_under_either_transformers_naming_load(pair, tmp_path):
    path, hf, model, params = pair
    tensors = load_file(str(path / "model.safetensors"))
    # transformers 5 still saves transformers 4's keys; a file under its module names loads as well
    assert any(k.startswith("vit.encoder.layer.0.attention.attention.query") for k in tensors)
    save_file({v5_name(k): v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    old_model, old_params = lowrax.load_pretrained(tmp_path, progress=False)
    x = pixels(seed=2)
    np.testing.assert_array_equal(ours(old_model, old_params, x), ours(model, params, x))
    # written back under the keys transformers writes, which it loads
    lowrax.save_pretrained(old_params, old_model, tmp_path / "saved")
    assert set(load_file(str(tmp_path / "saved" / "model.safetensors"))) == set(tensors)
    reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path / "saved").eval()
    np.testing.assert_allclose(torch_logits(reloaded, x), torch_logits(hf, x), atol=1e-6)


def test_wrong_pixel_shape_is_named(pair):
    _, _, model, params = pair
    with pytest.raises(LowraxError, match=r"pixel_values must be \[batch, 3, 16, 16\]"):
        forward(model)(params, jnp.zeros((1, 3, 32, 32)))


@pytest.mark.parametrize("settings", [
    dict(size={"height": 24, "width": 20}),
    dict(size={"shortest_edge": 28}, do_center_crop=True, crop_size={"height": 24, "width": 24}, resample=3,
         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
])
def test_image_processor_equals_transformers(settings, tmp_path):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in [(37, 53, 3), (64, 30, 3)]]
    reference = ViTImageProcessorPil(**settings)
    reference.save_pretrained(tmp_path)
    expected = reference(images, return_tensors="np")["pixel_values"]
    got = lowrax.ImageProcessor.from_pretrained(tmp_path)(images)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    # paths and grayscale images work too (converted to RGB)
    images[0].convert("L").save(tmp_path / "gray.png")
    assert lowrax.ImageProcessor.from_pretrained(tmp_path)([tmp_path / "gray.png"]).shape == (1,) + expected.shape[1:]



def test_lora_and_classifier_cross_with_peft_both_ways(pair, tmp_path):
    """PEFT's image-classification recipe: LoRA on query and value, the classifier trained in full (modules_to_save)."""
    path, _, model, params = pair
    x = pixels(seed=3)
    cfg = lowrax.LoraConfig(r=4, alpha=8, modules_to_save=("classifier",))  # the default targets: q_proj, v_proj
    wrapped = randomize(lowrax.wrap(params, cfg, jax.random.key(1), model=model), jax.random.key(2))
    lowrax.save_peft(wrapped, tmp_path / "ours", model)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"] and saved["modules_to_save"] == ["classifier"]
    base = transformers.ViTForImageClassification.from_pretrained(path).eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    got = ours(model, wrapped, x)
    assert np.abs(got - torch_logits(loaded, x)).max() <= 1e-4
    assert np.abs(got - ours(model, params, x)).max() > 1e-3
    torch.manual_seed(3)
    theirs = peft.get_peft_model(transformers.ViTForImageClassification.from_pretrained(path),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["classifier"], init_lora_weights=False)).eval()
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(0.1)
    theirs.save_pretrained(tmp_path / "theirs")
    back = lowrax.load_peft(params, tmp_path / "theirs", model)
    expected = torch_logits(theirs, x)
    assert np.abs(ours(model, back, x) - expected).max() <= 1e-4
    # the same adapter as a transformers-4 PEFT user saved it: query/value, encoder.layer keys
    old = tmp_path / "theirs-v4"
    old.mkdir()
    tensors = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert any(".attention.q_proj.lora_A" in k for k in tensors)
    save_file({v4_name(k): v for k, v in tensors.items()}, str(old / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["query", "value"]}))
    assert np.abs(ours(model, lowrax.load_peft(params, old, model), x) - expected).max() <= 1e-4


def image_folder(root, per_class=12, size=20):
    """Two classes a model can tell apart: reddish and bluish noisy images, PNG files under class subfolders."""
    rng = np.random.default_rng(0)
    for label, (name, channel) in enumerate([("blue", 2), ("red", 0)]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
            array[:, :, channel] += 160
            Image.fromarray(array).save(root / name / f"{i:03d}.png")
    return root


def test_image_folder_classification_run(tmp_path):
    """`lowrax train model.task=classification` on a ViT and an image folder: images resized by the model's
    processor, LoRA on q/v plus a fresh classifier, the head's size taken from the folder's classes."""
    from lowrax.train.config import load_config
    from lowrax.train.trainer import run_training

    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**SMALL), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    lowrax.ImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    data = image_folder(tmp_path / "images")
    cfg = load_config(None, [f"model.path={tmp_path / 'vit'}", "model.task=classification", f"data.source={data}",
                             "data.eval_fraction=0.25", f"train.output_dir={tmp_path / 'run'}", "train.steps=15",
                             "train.batch_size=6", "optim.learning_rate=1e-2", "train.samples=0"])
    summary = run_training(cfg, progress=False, log=lambda *_: None)
    assert summary["metric"] == "accuracy"
    assert summary["metric_after"] == 1.0 and summary["metric_before"] < 1.0
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    assert "num_labels: 2" in (tmp_path / "run" / "config.yaml").read_text()
    # the merged model is a ViTForImageClassification directory transformers reads, processor included
    from lowrax.train.runs import merge_run

    merged = merge_run(tmp_path / "run", tmp_path / "merged")
    reloaded = transformers.ViTForImageClassification.from_pretrained(merged).eval()
    assert reloaded.config.num_labels == 2 and (merged / "preprocessor_config.json").exists()


def test_image_folder_errors_name_the_problem(tmp_path):
    from lowrax.train.image_data import image_folder_splits

    (tmp_path / "only" / "cats").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "only" / "cats" / "a.png")
    with pytest.raises(LowraxError, match="at least two class subfolders"):
        image_folder_splits(tmp_path / "only")
    assert ViTModel.adapter_module_name("query") == "q_proj"


def test_bfloat16_base_with_float32_lora(pair):
    _, _, model, params = pair
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    x = pixels(seed=4)
    ref = ours(model, params, x)
    got = forward(model)(bf16, jnp.asarray(x)).logits
    assert got.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got, np.float32) - ref).max() <= 0.05 * np.abs(ref).max() + 0.02
    wrapped = lowrax.wrap(bf16, lowrax.LoraConfig(r=4, init="random"), jax.random.key(0), model=model)
    trainable, frozen = lowrax.split(wrapped)
    from lowrax.train.step import classification_loss

    batch = {"pixel_values": jnp.asarray(x), "labels": jnp.asarray([0, 1, 1])}
    grads = jax.tree.leaves(jax.jit(jax.grad(lambda t: classification_loss(model, lowrax.combine(t, frozen), batch)[0]))(trainable))
    assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all() for g in grads)
    assert max(float(jnp.abs(g).max()) for g in grads) > 0


def test_datasets_image_dataset_becomes_batches(tmp_path):
    """A `datasets` save_to_disk directory with an Image column trains like an image folder."""
    import datasets

    from lowrax.train.config import DataSection
    from lowrax.train.data import Batches, encode_all, load_records

    folder = image_folder(tmp_path / "images", per_class=3)
    files = sorted(folder.rglob("*.png"))
    dataset = datasets.Dataset.from_dict({"img": [str(f) for f in files], "label": [int(f.parent.name == "red") for f in files]})
    dataset.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    cfg = DataSection(source=str(tmp_path / "saved"), image_field="img", eval_fraction=0.0)
    train, _ = load_records(cfg)
    data = encode_all(lowrax.ImageProcessor(size={"height": 16, "width": 16}), train, cfg, "image_classification")
    batch = Batches(data, seq_len=1, batch_size=4, seed=0).batch(0)
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == np.float32
    assert sorted(set(batch["labels"].tolist())) <= [0, 1]
    with pytest.raises(LowraxError, match="need the fields image"):
        encode_all(None, [{"text": "x", "label": 0}], DataSection(), "image_classification")
    with pytest.raises(LowraxError, match="image encoders"):
        encode_all(None, [{"text": "x", "label": 0}], DataSection(format="classification"), "image_classification")
