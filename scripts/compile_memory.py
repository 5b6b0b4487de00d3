"""Compiled train-step buffers of a method on the default model and task shape (what `bench.py`'s
peak RSS mixes with the compiler's own memory):

    /usr/bin/time -v .venv-test/bin/python scripts/compile_memory.py lora      # "Maximum resident set size"
    /usr/bin/time -v .venv-test/bin/python scripts/compile_memory.py adalora

prints the compiled step's temporaries and arguments (XLA's `memory_analysis()`); the process's peak
resident memory, which `time -v` reports, is compilation's.
"""

import sys

import jax
import jax.numpy as jnp

import lowrax
from lowrax.train.optim import OptimizerConfig, make_optimizer
from lowrax.train.step import init_state, make_train_step

CONFIGS = {
    "lora": lambda: lowrax.LoraConfig(r=16, alpha=32, target_modules="all-linear"),
    "adalora": lambda: lowrax.AdaLoraConfig(init_r=16, target_r=8, alpha=32, tinit=5, tfinal=5, total_step=30,
                                            target_modules="all-linear"),
}

if __name__ == "__main__":
    method = sys.argv[1] if len(sys.argv) > 1 else "lora"
    model, params = lowrax.load_pretrained(None, progress=False)
    trainable, frozen = lowrax.split(lowrax.wrap(params, CONFIGS[method](), jax.random.key(0), model=model))
    optimizer = make_optimizer(OptimizerConfig())
    batch = {k: jnp.ones((16, 32), jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    compiled = jax.jit(make_train_step(model, optimizer), donate_argnums=(0,)).lower(
        init_state(trainable, optimizer), frozen, batch).compile()
    m = compiled.memory_analysis()
    print(f"{method}: compiled step temporaries {m.temp_size_in_bytes / 1e9:.2f} GB + arguments "
          f"{m.argument_size_in_bytes / 1e9:.2f} GB")
