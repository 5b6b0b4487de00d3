"""The train step on a device mesh, one or many processes.

    mesh = make_mesh(MeshConfig(fsdp=4))
    step, state, frozen = sharded_train_step(model, optimizer, mesh, state, frozen)
    state, metrics = step(state, frozen, global_batch(mesh, host_batch))

The step is the same pure function as on one device (`make_train_step`), jitted
with explicit in/out shardings from the rules in `lowrax.dist.sharding` and with the
state donated. Several processes (hosts) run the same program after
`initialize_distributed`; each builds the same host batch from the seeded data
order and hands the devices only the rows they hold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from lowrax.core.checked import Checked, Count, PositiveInt
from lowrax.errors import LowraxError
from lowrax.dist.sharding import (Mesh, batch_sharding, check_batch, param_shardings, replicated, shard,
                             state_shardings)
from lowrax.train.step import make_train_step


@dataclass(frozen=True)
class DistConfig(Checked):
    """Multi-process (multi-host) settings; unset fields come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID, and with none of them set the run is one process."""

    section_name = "dist"

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: PositiveInt | None = None  # processes in the job
    process_id: Count | None = None  # this process's index, 0 .. num_processes - 1
    local_device_ids: tuple[Count, ...] | None = None  # devices of this process (default: all it sees)


def initialize_distributed(cfg: DistConfig = DistConfig()) -> bool:
    """Call `jax.distributed.initialize` when the config or environment describes several
    processes; returns whether it did. Must run before any other JAX call."""
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = cfg.num_processes if cfg.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    if address is None and count is None and pid is None:
        return False
    if address is None or count is None or pid is None:
        raise LowraxError("a multi-process run needs dist.coordinator_address, dist.num_processes and dist.process_id "
                          f"(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); got address={address!r}, "
                          f"num_processes={count!r}, process_id={pid!r}")
    if not 0 <= pid < count:
        raise LowraxError(f"dist.process_id={pid} must be in 0..{count - 1} (num_processes={count})")
    # CPU devices of different processes talk through gloo; GPUs and TPUs use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, count, pid, local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids else None)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def is_primary() -> bool:
    """Process 0 writes the run's files (config, metrics, adapter, plots); every process writes checkpoints."""
    return jax.process_index() == 0


def sharded_train_step(model, optimizer, mesh: Mesh, state, frozen, *, grad_accum_steps: int = 1,
                       remat: bool = False, loss_fn=None, teacher=None, teacher_model=None, teacher_rules=None,
                       skip_nonfinite: bool = False, model_dropout: bool = True):
    """(jitted step, state and frozen half placed on the mesh).

    Parameters, adapters, NF4 blocks and optimizer state are sharded by the rules;
    the batch over data x fsdp; metrics come back replicated. The state is donated.
    With a distillation `teacher` (its params, of `teacher_model`), they are sharded by
    `teacher_rules` (default: the student's rules; `TEACHER_RULES` splits them over the data
    axis too) and passed to every call of the returned `step(state, frozen, batch)`.
    """
    trainable_sh = param_shardings(state.trainable, model, mesh)
    frozen_sh = param_shardings(frozen, model, mesh)
    state_sh = state_shardings(jax.eval_shape(lambda s: s, state), trainable_sh, optimizer, mesh)
    shardings = (state_sh, frozen_sh, batch_sharding(mesh, grad_accum_steps > 1))
    with_teacher = teacher is not None
    if with_teacher:
        teacher_sh = param_shardings(teacher, teacher_model, mesh, *([teacher_rules] if teacher_rules else []))
        shardings += (teacher_sh,)
    step = jax.jit(make_train_step(model, optimizer, grad_accum_steps=grad_accum_steps, remat=remat, loss_fn=loss_fn,
                                   with_teacher=with_teacher, skip_nonfinite=skip_nonfinite,
                                   model_dropout=model_dropout),
                   in_shardings=shardings, out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))
    if with_teacher:
        placed_teacher = shard(teacher, teacher_sh)
        jitted = step

        def step(state, frozen, batch):
            return jitted(state, frozen, batch, placed_teacher)
    return step, shard(state, state_sh), shard(frozen, frozen_sh)


def global_batch(mesh: Mesh, host_batch: dict, accumulation: bool = False) -> dict:
    """The host batch (the same numpy arrays in every process) as global arrays split over
    data x fsdp; each process transfers only the rows of its own devices."""
    sharding = batch_sharding(mesh, accumulation)
    check_batch(next(iter(host_batch.values())).shape[1 if accumulation else 0], mesh)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in host_batch.items()}


def host_local(tree: Any) -> Any:
    """A full copy of a (possibly multi-process) tree on this host, as numpy arrays: for
    scoring, generation and writing files, which run per process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    def local(x):
        if x is None:  # a position the other half of a split tree holds
            return None
        return np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(local, tree, is_leaf=lambda x: x is None)
