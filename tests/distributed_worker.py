"""One process of the two-process training test (tests/test_multiprocess.py); not a test itself.

    python tests/distributed_worker.py CONFIG_JSON

Runs `lowrax train` from the config's overrides with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID taken from the environment, on the CPU
devices XLA_FLAGS gives this process.
"""

import json
import sys

from lowrax.train.config import load_config
from lowrax.train.trainer import run_training

if __name__ == "__main__":
    overrides = json.loads(sys.argv[1])
    summary = run_training(load_config(None, overrides), progress=False, log=lambda *_: None)
    import jax

    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "local_devices": jax.local_device_count()}))
