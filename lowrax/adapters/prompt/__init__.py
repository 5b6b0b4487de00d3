"""Prompt learning: prompt tuning, P-tuning and prefix tuning (virtual tokens before the input)."""

from lowrax.adapters.prompt.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from lowrax.adapters.prompt.node import PrefixEncoder, PromptEncoder, PromptTable

__all__ = ["PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig", "PromptTable", "PromptEncoder",
           "PrefixEncoder"]
