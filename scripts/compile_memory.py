"""Compiled train-step buffers of a method on the default model and task shape (what `bench.py`'s
peak RSS mixes with the compiler's own memory):

    /usr/bin/time -v .venv-test/bin/python scripts/compile_memory.py lora      # "Maximum resident set size"
    /usr/bin/time -v .venv-test/bin/python scripts/compile_memory.py adalora
    .venv-test/bin/python scripts/compile_memory.py lora --batch 8 --seq 1024 --blocks none all

prints the compiled step's temporaries and arguments (XLA's `memory_analysis()`); the process's peak
resident memory, which `time -v` reports, is compilation's. `--blocks` compiles the step once per
setting: `default` (logits and attention scores by blocks only when large: `objectives.logps.LOGIT_WHOLE_LIMIT`,
`core.layers.ATTENTION_WHOLE_LIMIT`), `none` (both whole), `all` (both by blocks).
"""

import argparse

import jax
import jax.numpy as jnp

import lowrax
from lowrax.core import layers
from lowrax.objectives import logps
from lowrax.train.optim import OptimizerConfig, make_optimizer
from lowrax.train.step import init_state, make_train_step

CONFIGS = {
    "lora": lambda: lowrax.LoraConfig(r=16, alpha=32, target_modules="all-linear"),
    "adalora": lambda: lowrax.AdaLoraConfig(init_r=16, target_r=8, alpha=32, tinit=5, tfinal=5, total_step=30,
                                            target_modules="all-linear"),
}

def temporaries(model, trainable, frozen, batch_size: int, seq: int) -> tuple[float, float]:
    """(temporaries, arguments) in GB of the compiled LoRA step for one batch shape."""
    optimizer = make_optimizer(OptimizerConfig())
    batch = {k: jnp.ones((batch_size, seq), jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    compiled = jax.jit(make_train_step(model, optimizer), donate_argnums=(0,)).lower(
        init_state(trainable, optimizer), frozen, batch).compile()
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes / 1e9, m.argument_size_in_bytes / 1e9


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("method", nargs="?", default="lora", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--blocks", nargs="+", choices=("default", "none", "all"), default=["default"])
    args = parser.parse_args()
    model, params = lowrax.load_pretrained(None, progress=False)
    trainable, frozen = lowrax.split(lowrax.wrap(params, CONFIGS[args.method](), jax.random.key(0), model=model))
    defaults = logps.LOGIT_WHOLE_LIMIT, layers.ATTENTION_WHOLE_LIMIT
    for blocks in args.blocks:
        logps.LOGIT_WHOLE_LIMIT, layers.ATTENTION_WHOLE_LIMIT = {"default": defaults, "none": (1 << 62, 1 << 62),
                                                                 "all": (0, 0)}[blocks]
        temp, arguments = temporaries(model, trainable, frozen, args.batch, args.seq)
        print(f"{args.method}, batch {args.batch} x {args.seq}, blocks {blocks}: "
              f"compiled step temporaries {temp:.2f} GB + arguments {arguments:.2f} GB", flush=True)
