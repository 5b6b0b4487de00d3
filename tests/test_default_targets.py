"""Default target modules come from one source, the families' module roles, and equal PEFT's tables."""

from __future__ import annotations

import pytest

import lowrax
from lowrax.adapters.registry import method_named
from lowrax.adapters.targets import default_targets
from lowrax.models import FAMILIES

peft_constants = pytest.importorskip("peft.utils.constants", reason="the comparison reads PEFT's tables (pip install -e .[test])")


def peft_table(method: str) -> dict:
    name = f"TRANSFORMERS_MODELS_TO_{method.upper().replace('_', '')}_TARGET_MODULES_MAPPING"
    assert hasattr(peft_constants, name), f"PEFT has no {name}: say where {method}'s defaults come from"
    return getattr(peft_constants, name)


def methods_with_defaults() -> list[str]:
    """Methods whose defaults come from a PEFT table (trainable tokens' default is the model's input
    embedding, which PEFT asks the model for: tests/test_trainable_tokens.py exchanges it both ways)."""
    return [name for name in lowrax.method_names() if method_named(name).default_roles and name != "trainable_tokens"]


def test_every_method_with_default_targets_is_compared():
    assert set(methods_with_defaults()) == {"lora", "loha", "lokr", "oft", "ia3", "adalora", "ln_tuning", "c3a", "fourierft",
                                            "hira", "shira", "delora", "miss", "gralora", "hra", "road", "boft",
                                            "beft", "peanut", "supertuning", "deft", "vblora", "pvera", "randlora", "tinylora", "unilora", "osf", "lily", "glora", "frod"}


@pytest.mark.parametrize("method", methods_with_defaults())
def test_defaults_equal_peft_for_every_family_peft_lists(method):
    table, compared = peft_table(method), 0
    for model_type in FAMILIES:
        if model_type in table:
            ours = default_targets(method, method_named(method).default_roles, model_type)
            theirs = set(table[model_type])
            if model_type == "vit":  # some of PEFT's tables still name ViT's modules as transformers 4 did
                from lowrax.models.vit import _V4_MODULE_NAMES

                theirs = {_V4_MODULE_NAMES.get(name, name) for name in theirs}
            assert ours is not None and set(ours) == theirs, (model_type, ours, table[model_type])
            compared += 1
    assert compared >= 5  # PEFT's table covers at least five of lowrax's families (OSF's: five)


def test_ia3_feedforward_defaults_equal_peft():
    table = peft_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    from lowrax.adapters.ia3 import FEEDFORWARD_ROLES

    for model_type in FAMILIES:
        if model_type in table:
            assert set(default_targets("ia3_feedforward", FEEDFORWARD_ROLES, model_type)) == set(table[model_type])


@pytest.mark.parametrize("method", methods_with_defaults())
def test_every_family_has_defaults_for_every_method(method):
    """Where PEFT has no entry (Phi-3 everywhere, Mistral for AdaLoRA, ViT, BERT's norms) the roles give one."""
    for model_type in FAMILIES:
        assert default_targets(method, method_named(method).default_roles, model_type), (method, model_type)


def test_derived_defaults_name_modules_of_the_family():
    assert default_targets("lora", ("q", "v"), "phi3") == ("qkv_proj",)
    assert default_targets("adalora", ("q", "v"), "mistral") == ("q_proj", "v_proj")
    assert default_targets("ia3", ("k", "v", "mlp_out"), "phi3") == ("qkv_proj", "down_proj")
    assert default_targets("lora", ("q", "v"), "unknown") is None
