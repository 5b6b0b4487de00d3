"""`lowrax.combine_adapters` equals PEFT's `add_weighted_adapter` for every combination type
(DARE given PEFT's own drop masks), with PEFT's defaults and refusals."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="adapter-combination parity tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="adapter-combination parity tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from peft.tuners.lora.model import LoraModel  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

import lowrax  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from lowrax.merging.combine_adapters import svd_factors  # noqa: E402
from lowrax.merging import rules  # noqa: E402
from tests.conftest import forward, hf_model_dir, random_batch  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)
ADAPTERS = {  # a and c: equal ranks (the factor-wise types), c on fewer kernels; b: another rank, rsLoRA
    "a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "c": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}
PEFT_PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, _ = hf_model_dir(tmp_path_factory, "combine-llama",
                           lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)))
    dirs = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(20 + i)
        base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        dirs[name] = tmp_path_factory.mktemp(f"adapter-{name}")
        peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **kwargs)).save_pretrained(dirs[name])
    model, params = lowrax.load_pretrained(path, progress=False)
    held = params
    for name in ADAPTERS:
        held = lowrax.load_peft(held, dirs[name], model, adapter_name=name)
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), dirs["a"], adapter_name="a").eval()
    for name in ("b", "c"):
        reference.load_adapter(dirs[name], adapter_name=name)
    ids, mask = random_batch(96, [7, 5], pad_id=0, left=True)
    return model, held, reference, ids, mask


@contextlib.contextmanager
def recorded_peft_masks():
    """PEFT's DARE masks as lowrax's keep_masks {(layer, part, index): [lowrax layout]}: PEFT draws
    them per layer in order (factor-wise: A then B of each adapter present; SVD types: each delta)."""
    masks, current = {}, {}
    original_prune, generalized, svd = (merge_utils.random_pruning, LoraModel._generalized_task_arithmetic_weighted_adapter,
                                        LoraModel._svd_generalized_task_arithmetic_weighted_adapter)

    def recording_prune(tensor, density, rescale):
        keep = torch.bernoulli(torch.full_like(tensor, density))
        layer, parts = current["layer"], current["parts"]
        masks[(layer, *parts[current["count"]])] = keep.T.numpy().astype(bool)
        current["count"] += 1
        return tensor * keep / density if rescale else tensor * keep

    def entering(method, parts_of):
        """`method` of LoraModel with the layer it works on noted first (target: its 4th argument)."""
        def wrapped(self, *args, **kwargs):
            target = args[3] if len(args) > 3 and not isinstance(args[3], int) else args[4]
            name = next(n for n, m in self.model.named_modules() if m is target)  # lowrax's layer name
            present = [i for i, a in enumerate(args[1]) if a in target.lora_A]
            current.update(layer=name, parts=parts_of(present), count=0)
            return method(self, *args, **kwargs)
        return wrapped

    merge_utils.random_pruning = recording_prune
    LoraModel._generalized_task_arithmetic_weighted_adapter = entering(
        generalized, lambda present: [("a", i) for i in present] + [("b", i) for i in present])
    LoraModel._svd_generalized_task_arithmetic_weighted_adapter = entering(
        svd, lambda present: [("delta", i) for i in present])
    try:
        yield masks
    finally:
        merge_utils.random_pruning = original_prune
        LoraModel._generalized_task_arithmetic_weighted_adapter = generalized
        LoraModel._svd_generalized_task_arithmetic_weighted_adapter = svd


def peft_logits(reference, name, ids, mask):
    reference.set_adapter(name)
    with torch.no_grad():
        return reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits.numpy()


CASES = [  # (combination_type, adapters, weights, extra kwargs)
    ("linear", ["a", "c"], [0.7, -0.4], {}),
    ("cat", ["a", "b"], [0.6, 0.9], {}),
    ("svd", ["a", "b"], [0.7, 0.3], {}),
    ("svd", ["a", "b", "c"], [1.0, 0.5, -0.5], dict(svd_rank=3, svd_full_matrices=False)),
    ("ties", ["a", "c"], [0.8, 0.5], dict(density=0.5)),
    ("ties_svd", ["a", "b"], [0.8, 0.5], dict(density=0.4, majority_sign_method="frequency")),
    ("magnitude_prune", ["a", "c"], [0.8, 0.5], dict(density=0.3)),
    ("magnitude_prune_svd", ["a", "b"], [0.8, 0.5], dict(density=0.6)),
    ("dare_linear", ["a", "c"], [0.8, 0.5], dict(density=0.5)),
    ("dare_ties", ["a", "c"], [0.8, 0.5], dict(density=0.7)),
    ("dare_linear_svd", ["a", "b"], [0.8, 0.5], dict(density=0.5)),
    ("dare_ties_svd", ["a", "b"], [0.8, 0.5], dict(density=0.5, majority_sign_method="frequency")),
    ("linear", ["b"], [2.0], {}),  # one adapter: linear whatever the type asked (PEFT's rule)
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{''.join(c[1])}" for c in CASES])
def test_combination_equals_peft(setup, case):
    model, held, reference, ids, mask = setup
    combination_type, adapters, weights, kwargs = CASES[case]
    name = f"m{case}"
    torch.manual_seed(case)
    with recorded_peft_masks() as masks:
        reference.add_weighted_adapter(adapters, weights, name, combination_type=combination_type, **kwargs)
    keep = (lambda layer, part, index, shape: masks[(layer, part, index)]) if "dare" in combination_type else None
    combined = lowrax.combine_adapters(held, adapters, weights, name, combination_type, keep_masks=keep, **kwargs)
    ours = np.asarray(forward(model)(lowrax.set_adapter(combined, name), jnp.asarray(ids), jnp.asarray(mask)))
    theirs = peft_logits(reference, name, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - theirs[valid]).max() <= 1e-4
    assert np.abs(ours - np.asarray(forward(model)(lowrax.disable_adapters(combined), jnp.asarray(ids),
                                                jnp.asarray(mask)))).max() > 1e-4  # the adapter does something
    # PEFT's rank for the new adapter
    ours_rank = lowrax.extract_adapter(combined, name)["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].rank
    assert ours_rank == reference.peft_config[name].r


def test_svd_clamp_is_peft_rule():
    """PEFT clamps U * S and Vh at a quantile of their joined values. The SVD's sign per singular
    pair is the library's choice (torch's and XLA's differ on some pairs), so the clamped adapter is
    compared given the same SVD: torch's quantile and clamp applied to lowrax's unclamped factors."""
    delta = jax.random.normal(jax.random.key(0), (24, 3)) @ jax.random.normal(jax.random.key(1), (3, 40))
    u, vh = svd_factors(delta, 3)
    np.testing.assert_allclose(np.asarray(u @ vh), np.asarray(delta), atol=1e-4)
    clamped_u, clamped_vh = svd_factors(delta, 3, clamp=0.9)
    tu, tv = torch.tensor(np.asarray(u)), torch.tensor(np.asarray(vh))
    high = torch.quantile(torch.cat([tu.flatten(), tv.flatten()]), 0.9)
    np.testing.assert_allclose(np.asarray(clamped_u), tu.clamp(-high, high).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(clamped_vh), tv.clamp(-high, high).numpy(), atol=1e-6)
    assert float(jnp.abs(clamped_u - u).max()) > 0  # the quantile clips something


def test_the_combined_adapter_saves_in_peft_format_and_trains(setup, tmp_path):
    model, held, reference, ids, mask = setup
    combined = lowrax.combine_adapters(held, ["a", "b"], [0.5, 0.5], "ab", "cat")
    lowrax.save_peft(combined, tmp_path / "ab", model, adapter_name="ab")
    reference.load_adapter(tmp_path / "ab", adapter_name="ab_saved")
    ours = np.asarray(forward(model)(lowrax.set_adapter(combined, "ab"), jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - peft_logits(reference, "ab_saved", ids, mask)[valid]).max() <= 1e-4
    tree = lowrax.extract_adapter(combined, "ab")
    trainable, frozen = lowrax.split(tree)
    grads = jax.grad(lambda t: jnp.mean(forward(model)(lowrax.combine(t, frozen), jnp.asarray(ids), jnp.asarray(mask)) ** 2))(trainable)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_dare_with_a_key_is_right_in_expectation():
    """Averaged over many keys, DARE's rescaled random drop gives back the weighted sum."""
    tensors = [jax.random.normal(jax.random.key(i), (12, 6)) for i in range(2)]
    weights = [0.7, 0.3]
    expected = rules.combine("linear", tensors, weights)

    def one(key):
        keep = [jax.random.bernoulli(k, 0.5, (12, 6)) for k in jax.random.split(key)]
        return rules.combine("dare_linear", tensors, weights, 0.5, keep=keep)

    mean = jax.vmap(one)(jax.random.split(jax.random.key(0), 4000)).mean(axis=0)
    assert float(jnp.abs(mean - expected).max()) < 0.1 * float(jnp.abs(expected).max())
    assert float(jnp.abs(one(jax.random.key(1)) - expected).max()) > 0.1  # one draw is not the sum


def test_dare_draws_from_the_key(setup):
    model, held, _, ids, mask = setup
    once = lowrax.combine_adapters(held, ["a", "c"], [0.5, 0.5], "d", "dare_linear", density=0.5, key=jax.random.key(3))
    again = lowrax.combine_adapters(held, ["a", "c"], [0.5, 0.5], "d", "dare_linear", density=0.5, key=jax.random.key(3))
    other = lowrax.combine_adapters(held, ["a", "c"], [0.5, 0.5], "d", "dare_linear", density=0.5, key=jax.random.key(4))
    factors = lambda p: lowrax.extract_adapter(p, "d")["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"].a  # noqa: E731
    np.testing.assert_array_equal(factors(once), factors(again))
    assert float(jnp.abs(factors(once) - factors(other)).max()) > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(adapters=["a", "zz"]), "Adapter zz does not exist"),
    (dict(adapters=["a", "b"], combination_type="linear"), "same r value"),
    (dict(adapters=["a", "b"], combination_type="ties"), "same r value"),
    (dict(adapters=["a", "c"], combination_type="ties"), "give density="),
    (dict(adapters=["a", "c"], combination_type="ties", density=-0.1), "density must be >= 0"),
    (dict(adapters=["a", "c"], combination_type="dare_linear", density=0.5), "pass key=jax.random.key"),
    (dict(adapters=["a", "c"], combination_type="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method"),
    (dict(adapters=["a", "c"], combination_type="average"), "Invalid combination_type: average"),
    (dict(adapters=["a", "c"], weights=[1.0]), "one weight per adapter"),
    (dict(adapters=["a", "c"], adapter_name="b"), "already loaded"),
])
def test_invalid_combinations_are_refused(setup, kwargs, message):
    _, held, _, _, _ = setup
    args = dict(adapters=["a", "b"], weights=[0.5, 0.5], adapter_name="new") | kwargs
    if len(args["weights"]) == 2 and len(args["adapters"]) != 2:
        args["weights"] = [0.5] * len(args["adapters"])
    with pytest.raises(LowraxError, match=message):
        lowrax.combine_adapters(held, **args)


def test_magnitude_pruning_traced_equals_eager():
    """Outside a trace the k largest are selected on the host; under jit by top_k: the same elements."""
    t = jax.random.normal(jax.random.key(5), (40, 24))
    eager = rules.magnitude_pruned(t, 0.3)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: rules.magnitude_pruned(x, 0.3))(t)), np.asarray(eager))
    assert int((np.asarray(eager) != 0).sum()) == int(0.3 * t.size)
