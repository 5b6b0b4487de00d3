"""The conformance suite: every registered adapter method's examples on every registered model family.

Cases come from the registries (lowrax.adapters.registry's examples, lowrax.models.FAMILIES), not
a hand list: a method or family that registers gets every contract below.

- wrap with the method's defaults (targets from the family's module roles), or a refusal that
  names the family;
- at init the model computes what the base did, where the method promises it;
- the trained adapter changes the model, and its exchange format (PEFT's, AdapterHub's)
  saved and loaded back gives the same outputs;
- merging gives the same outputs and unmerging restores the tree (or a refusal that says why);
- over a bfloat16 base it stays within 5% of float32 with float32 adapter arrays;
- its optimizer state and adapters survive an orbax save and restore (one family).
The sharded step equal to one device runs in tests/sharding_cases.py over the same registry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
from lowrax.adapters.registry import method_named
from lowrax.errors import LowraxError
from tests.conformance_models import families, outputs, tiny
from tests.test_peft_exchange import randomize


def examples() -> list[tuple[str, str]]:
    return [(name, example) for name in lowrax.method_names() for example in method_named(name).examples]


def assert_names_the_family(error: LowraxError, model, what: str) -> None:
    message = str(error)
    named = model.model_type in message or {"gpt2": "GPT-2", "t5": "T5", "vit": "ViT", "bert": "BERT"}.get(
        model.model_type, "?") in message
    assert named, f"{what} on {model.model_type} was refused without naming the family: {message}"


def wrapped_or_refused(name: str, example: str, family: str, base=None):
    """(model, base, inputs, wrapped), or None when the method refuses the family: the refusal
    must name the family (that is the contract for pairs a method does not support)."""
    model, params, inputs = tiny(family)
    base = params if base is None else base
    try:
        return model, base, inputs, lowrax.wrap(base, method_named(name).examples[example](), jax.random.key(1),
                                                model=model)
    except LowraxError as e:
        assert_names_the_family(e, model, example)
        return None


def close(a, b, tol) -> float:
    scale = max(float(np.abs(b).max()), 1.0)
    diff = float(np.abs(a - b).max()) / scale
    assert diff <= tol, f"relative difference {diff:.2e} over {tol:.0e}"
    return diff


@pytest.mark.parametrize("family", families())
@pytest.mark.parametrize("name, example", examples())
def test_method_contracts_on_family(name, example, family, tmp_path):
    case = wrapped_or_refused(name, example, family)
    if case is None:
        return
    model, base, inputs, wrapped = case
    method = method_named(name)
    before = outputs(model, base, inputs)
    if method.identity_at_init:
        close(outputs(model, wrapped, inputs), before, 1e-5)
    trained = randomize(wrapped, jax.random.key(2))
    after = outputs(model, trained, inputs)
    assert np.abs(after - before).max() > 1e-6, "the trained adapter does not change the model"  # COFT: within eps

    try:
        lowrax.save_peft(trained, tmp_path / "adapter", model, initial=wrapped)
    except LowraxError as e:  # the exchange format has no place for this pair (PEFT's LoHa on GPT-2's Conv1D)
        assert_names_the_family(e, model, f"saving {example}")
    else:
        loaded = lowrax.load_peft(base, tmp_path / "adapter", model)
        close(outputs(model, loaded, inputs), after, 1e-4)

    try:
        merged = lowrax.merge(trained)
    except LowraxError as e:
        assert "cannot be merged" in str(e) or "merge" in str(e), str(e)
        return
    close(outputs(model, merged, inputs), after, 1e-4)
    close(outputs(model, lowrax.unmerge(merged, trained), inputs), after, 1e-4)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("name, example", examples())
def test_method_over_a_bfloat16_base(name, example, family):
    model, params, inputs = tiny(family)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    case32, case16 = wrapped_or_refused(name, example, family), wrapped_or_refused(name, example, family, base=bf16)
    if case32 is None:
        assert case16 is None
        return
    wrapped32, wrapped16 = case32[3], case16[3]
    trainable16 = lowrax.split(wrapped16)[0]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable16)), "adapter arrays are not float32"
    if method_named(name).frozen_from_base:  # its frozen basis comes from the (rounded) base: compare at init
        model = case16[0]
        close(outputs(model, wrapped16, case16[2]), outputs(model, bf16, case16[2]), 0.05)
        return
    trained32 = randomize(wrapped32, jax.random.key(2))
    moved = lowrax.split(trained32)[0]
    trained16 = lowrax.combine(moved, lowrax.split(wrapped16)[1])
    ours = outputs(model, trained16, inputs)
    assert np.isfinite(ours).all()
    close(ours, outputs(model, trained32, inputs), 0.05)


@pytest.mark.parametrize("name, example", examples())
def test_method_state_survives_an_orbax_save_and_restore(name, example, tmp_path):
    from lowrax.train.checkpoints import Checkpoints

    case = wrapped_or_refused(name, example, "llama")
    assert case is not None, f"{example} must train on llama (the suite's reference family)"
    wrapped = case[3]
    trainable, _ = lowrax.split(randomize(wrapped, jax.random.key(2)))
    optimizer = lowrax.make_optimizer(lowrax.OptimizerConfig())
    state = lowrax.init_state(trainable, optimizer)
    ckpts = Checkpoints(tmp_path / "checkpoints")
    ckpts.save(3, state, {"step": 3})
    template = lowrax.init_state(lowrax.split(wrapped)[0], optimizer)
    restored, meta = ckpts.restore(3, template)
    ckpts.close()
    assert meta["step"] == 3
    for ours, saved in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(saved))


def test_the_suite_covers_every_registered_method_and_family():
    covered = {name for name, _ in examples()}
    assert covered == set(lowrax.method_names()), f"methods without examples: {set(lowrax.method_names()) - covered}"
    assert len(families()) >= 10
