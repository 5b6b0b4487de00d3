"""Kept for code written against lowrax 0.1's README; the home of these names is `lowrax.dist.sharding`."""

from lowrax.dist.sharding import RULES, MeshConfig, make_mesh, param_shardings  # noqa: F401
