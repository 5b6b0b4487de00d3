"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) in the block's residual stream, with
AdapterHub's config names and directory format: `config.py`, `node.py`, `method.py`
(registration, init), `adapterhub.py` (the directory format both ways)."""

from lowrax.adapters.bottleneck.config import BottleneckConfig
from lowrax.adapters.bottleneck.node import BottleneckAdapter

__all__ = ["BottleneckConfig", "BottleneckAdapter"]
