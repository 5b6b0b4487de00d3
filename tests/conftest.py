"""Shared fixtures: small random-initialised HF models saved to disk, built from configs."""

from __future__ import annotations

import numpy as np
import pytest


def hf_model_dir(tmp_path_factory, name: str, build):
    """Save the torch model `build()` returns as an HF directory; returns (dir, torch model)."""
    torch = pytest.importorskip("torch", reason="parity tests need the torch reference (pip install -e .[test])")
    torch.manual_seed(0)
    model = build().eval()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return path, model


def random_batch(vocab: int, lengths: list[int], pad_id: int, left: bool, seed: int = 0):
    """(ids, mask) int arrays [b, max(lengths)] padded on the left or right with pad_id."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), pad_id, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        span = slice(t - n, t) if left else slice(0, n)
        ids[row, span] = rng.integers(3, vocab, n)
        mask[row, span] = 1
    return ids, mask
