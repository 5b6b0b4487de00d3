"""Model families, keyed by the HF `model_type` in `config.json`."""

from __future__ import annotations

from lowrax.errors import UnsupportedModelError
from lowrax.models.base import CausalLM, Model
from lowrax.models.bert import BertConfig, BertModel, EncoderOutput
from lowrax.models.gpt2 import GPT2Config, GPT2Model
from lowrax.models.gemma2 import Gemma2Config, Gemma2Model
from lowrax.models.llama import LlamaConfig, LlamaModel
from lowrax.models.phi3 import Phi3Model
from lowrax.models.t5 import T5Config, T5Model
from lowrax.models.vit import ViTConfig, ViTModel

# model_type -> (config class, model class)
FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaModel),
    "mistral": (LlamaConfig, LlamaModel),
    "qwen2": (LlamaConfig, LlamaModel),
    "phi3": (LlamaConfig, Phi3Model),
    "gemma2": (Gemma2Config, Gemma2Model),
    "gpt2": (GPT2Config, GPT2Model),
    "bert": (BertConfig, BertModel),
    "roberta": (BertConfig, BertModel),
    "t5": (T5Config, T5Model),
    "vit": (ViTConfig, ViTModel),
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def model_from_hf_config(hf: dict, **config_overrides) -> Model:
    """Build the model object for an HF `config.json` dict.

    `config_overrides` go to the family's `from_hf` (e.g. `num_labels` for encoders).
    """
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; lowrax supports: {', '.join(supported_model_types())}"
        )
    config_cls, model_cls = FAMILIES[model_type]
    return model_cls(config_cls.from_hf(hf, **config_overrides))


__all__ = [
    "FAMILIES", "Model", "CausalLM", "LlamaModel", "LlamaConfig", "GPT2Model", "GPT2Config", "Phi3Model", "Gemma2Model", "Gemma2Config",
    "BertModel", "BertConfig", "T5Model", "T5Config", "ViTModel", "ViTConfig", "EncoderOutput", "model_from_hf_config", "supported_model_types",
]
