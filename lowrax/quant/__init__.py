"""Quantized base weights (NF4, as bitsandbytes stores them)."""
