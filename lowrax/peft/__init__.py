"""PEFT's adapter format (`adapter_model.safetensors` + `adapter_config.json`): the generic
reader and writer (`format`), which dispatch on `peft_type` through the adapter registry,
and what every method's part of the format shares (`common`)."""
