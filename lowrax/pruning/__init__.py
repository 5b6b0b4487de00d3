"""Pruning: magnitude, Wanda and SparseGPT, unstructured and N:M (`prune.py`), and the sparse
base kernel they leave (`sparse.py`). Import the submodules; this package imports nothing, so
the adapters and model code can use `sparse` without pulling in the pruning driver."""
