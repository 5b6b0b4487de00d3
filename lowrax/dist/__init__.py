"""Scaling out: the mesh and its sharding rules (sharding.py), the sharded step and several processes (parallel.py)."""
