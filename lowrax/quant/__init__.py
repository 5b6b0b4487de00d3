"""Quantized base weights (NF4 and int8, as bitsandbytes stores them). Importing the package
registers both as kernel types, so `linear` knows them wherever a quantized tensor comes from."""

from lowrax.quant import int8, nf4_kernel  # noqa: F401  (each registers its kernel type)
