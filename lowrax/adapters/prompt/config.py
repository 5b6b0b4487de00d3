"""The prompt-learning methods' configs, with PEFT's names and defaults: prompt tuning
(`PromptTuningConfig`), P-tuning (`PromptEncoderConfig`) and prefix tuning
(`PrefixTuningConfig`). The model's dimensions (PEFT's token_dim, num_layers,
num_attention_heads) come from the model at `wrap` time, not from the config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lowrax.adapters.targets import config_from_dict
from lowrax.core.checked import Checked, PositiveInt, Probability
from lowrax.errors import LowraxError

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
ENCODERS = ("MLP", "LSTM")


@dataclass(frozen=True, kw_only=True)
class PromptLearningConfig(Checked):
    """What every prompt-learning method has: its virtual tokens and the modules trained in full."""

    num_virtual_tokens: PositiveInt = 20
    modules_to_save: str | tuple[str, ...] = ()  # e.g. ("classifier",)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))

    @classmethod
    def from_dict(cls, values: dict):
        return config_from_dict(cls, values)

    def for_run(self, *, steps: int, model_dir=None) -> "PromptLearningConfig":
        """As `TargetConfig.for_run`: unchanged unless the method's settings depend on the run."""
        return self


@dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021): learned embeddings before the input's."""

    prompt_tuning_init: str = "RANDOM"  # RANDOM: N(0, 1); TEXT: the embeddings of a text's tokens; SAMPLE_VOCAB
    prompt_tuning_init_text: str | None = None  # for TEXT
    tokenizer_name_or_path: str | None = None  # for TEXT: a local tokenizer (lowrax train: the model's)

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_tuning_init not in INITS:
            raise LowraxError(f"PromptTuningConfig.prompt_tuning_init must be one of {', '.join(INITS)}, "
                              f"got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise LowraxError("PromptTuningConfig.prompt_tuning_init='TEXT' needs prompt_tuning_init_text "
                              "(the text whose token embeddings start the virtual tokens)")

    def for_run(self, *, steps: int, model_dir=None) -> "PromptTuningConfig":
        """A text init with no tokenizer named encodes the text with the run's model's own."""
        if self.prompt_tuning_init == "TEXT" and self.tokenizer_name_or_path is None and model_dir is not None:
            return dataclasses.replace(self, tokenizer_name_or_path=str(model_dir))
        return self


@dataclass(frozen=True, kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al. 2021, "GPT Understands, Too"): the virtual tokens' embeddings come
    out of a small encoder (an MLP, or a bidirectional LSTM then an MLP) over a learned table."""

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: PositiveInt | None = None  # None: the model's hidden size
    encoder_num_layers: PositiveInt = 2  # LSTM layers (the MLP always has PEFT's three)
    encoder_dropout: Probability = 0.0  # between LSTM layers, in training

    def __post_init__(self):
        super().__post_init__()
        if self.encoder_reparameterization_type not in ENCODERS:
            raise LowraxError(f"PromptEncoderConfig.encoder_reparameterization_type must be one of "
                              f"{', '.join(ENCODERS)}, got {self.encoder_reparameterization_type!r}")


@dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li and Liang 2021): learned keys and values before every attention layer's."""

    prefix_projection: bool = False  # True: the prefix is an MLP (tanh) of a [v, hidden] table
    encoder_hidden_size: PositiveInt | None = None  # the projection's width; None: the model's hidden size
    init_weights: str | None = None  # None: random, as PEFT; "zero": the prefix (or the projection's output) zero

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise LowraxError(f"PrefixTuningConfig.init_weights must be null or 'zero', got {self.init_weights!r}")
