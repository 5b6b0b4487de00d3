"""Compiled train-step buffers (and, on request, step time and where it goes) of a method on the default
model and task shape (what `bench.py`'s peak RSS mixes with the compiler's own memory):

    /usr/bin/time -v .venv-test/bin/python scripts/compile_memory.py lora      # "Maximum resident set size"
    /usr/bin/time -v .venv-test/bin/python scripts/compile_memory.py adalora
    .venv-test/bin/python scripts/compile_memory.py lora --batch 8 --seq 1024 --blocks none all
    .venv-test/bin/python scripts/compile_memory.py lora --batch 4 --seq 256 --time 6        # the text recipe's step
    .venv-test/bin/python scripts/compile_memory.py --classifier --time 6 --profile        # the MiniLM recipe's step
    .venv-test/bin/python scripts/compile_memory.py lora --batch 4 --seq 256 --lora-forms --time 8

prints the compiled step's temporaries and arguments (XLA's `memory_analysis()`); the process's peak
resident memory, which `time -v` reports, is compilation's. `--blocks` compiles the step once per
setting of the attention: `default` (scores by blocks of queries only when large:
`core.layers.ATTENTION_WHOLE_LIMIT`), `none` (whole), `all` (by blocks). The logits always go by blocks
(`objectives.fused_logps`).
`--classifier` compiles the sentiment recipe's step instead (all-MiniLM-L6-v2 with a 2-label head, LoRA r 8
on query and value, batch 16 x 128, the model's own dropout on; --batch/--seq change its shape).
`--time N` runs the compiled step N times and prints the minimum and median seconds; `--profile` traces
three steps with `jax.profiler` and prints the op time by kind (matmul fusions, copies, random bits, ...),
summed over XLA's threads, so it can exceed the step's wall time. `--resident` reports what a compiled step keeps resident after it has run: the process's anonymous
memory (after `malloc_trim`) with the executable held and after it is dropped (each batch width a run
trains at holds one; `data.planned_trim_widths` bounds their number). `--lora-forms` compiles the step twice,
with LoRA layers as two matmuls and an add and as one concatenated matmul (`adapters.lora.fused`), and
with `--time N` runs the two programs' steps alternately in one process, so machine noise hits both.
"""

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import lowrax
from lowrax.core import layers
from lowrax.train.host_memory import relaunch_with_huge_pages
from lowrax.train.optim import OptimizerConfig, make_optimizer
from lowrax.train.step import init_state, make_train_step

CONFIGS = {
    "lora": lambda: lowrax.LoraConfig(r=16, alpha=32, target_modules="all-linear"),
    "adalora": lambda: lowrax.AdaLoraConfig(init_r=16, target_r=8, alpha=32, tinit=5, tfinal=5, total_step=30,
                                            target_modules="all-linear"),
    # the variants bench's settings (scripts/bench_variants.py)
    "loha": lambda: lowrax.LoHaConfig(r=8, alpha=16, target_modules="all-linear"),
    "lokr": lambda: lowrax.LoKrConfig(r=16, alpha=32, target_modules="all-linear"),
    "prompt_tuning": lambda: lowrax.PromptTuningConfig(num_virtual_tokens=20),
}


def causal_lm_step(method: str, batch_size: int, seq: int):
    """(model, trainable, frozen, batch) of the embedded SmolLM2 with the method on every linear layer."""
    model, params = lowrax.load_pretrained(None, progress=False)
    trainable, frozen = lowrax.split(lowrax.wrap(params, CONFIGS[method](), jax.random.key(0), model=model))
    ids = np.random.default_rng(0).integers(100, model.config.vocab_size, (batch_size, seq))
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.ones((batch_size, seq), jnp.int32),
             "loss_mask": jnp.ones((batch_size, seq), jnp.int32)}
    return model, trainable, frozen, batch


def classifier_step(batch_size: int, seq: int):
    """(model, trainable, frozen, batch) of the sentiment recipe: MiniLM, a fresh 2-label head, LoRA on q/v."""
    from lowrax.models.pretrained import embedded_minilm_path
    from lowrax.train.build import _load_model
    from lowrax.train.config import load_config

    cfg = load_config(None, [f"model.path={embedded_minilm_path()}", "model.task=classification", "model.num_labels=2"])
    model, params = _load_model(cfg, jax.random.key(1))
    config = lowrax.LoraConfig(r=8, alpha=16, target_modules=["query", "value"])
    trainable, frozen = lowrax.split(lowrax.wrap(params, config, jax.random.key(0), model=model))
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(1000, 20000, (batch_size, seq)), jnp.int32),
             "attention_mask": jnp.ones((batch_size, seq), jnp.int32),
             "labels": jnp.asarray(rng.integers(0, 2, (batch_size,)), jnp.int32)}
    return model, trainable, frozen, batch


def compiled_step(model, trainable, frozen, batch):
    optimizer = make_optimizer(OptimizerConfig())
    step = jax.jit(make_train_step(model, optimizer), donate_argnums=(0,))
    return step.lower(init_state(trainable, optimizer), frozen, batch).compile(), optimizer


def run_steps(compiled, state, frozen, batch, steps: int):
    """(state after `steps` more steps, each step's seconds)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return state, times


def compare_lora_forms(model, trainable, frozen, batch, steps: int) -> None:
    """Print the step's temporaries with each LoRA form and, for steps > 0, their step times taken in turn."""
    from lowrax.adapters.lora import fused

    programs, default_rows = {}, fused.FUSED_FROM_ROWS
    for form, rows in (("two matmuls + add", 1 << 62), ("one concatenated matmul", default_rows)):
        fused.FUSED_FROM_ROWS = rows
        compiled, optimizer = compiled_step(model, trainable, frozen, batch)
        print(f"LoRA as {form}: compiled step temporaries {compiled.memory_analysis().temp_size_in_bytes / 1e9:.2f} GB",
              flush=True)
        state, _ = run_steps(compiled, init_state(jax.tree.map(jnp.copy, trainable), optimizer), frozen, batch, 1)
        programs[form] = [compiled, state, []]
    fused.FUSED_FROM_ROWS = default_rows
    for i in range(steps):
        for form in (list(programs) if i % 2 else list(programs)[::-1]):
            compiled, state, times = programs[form]
            programs[form][1], step_times = run_steps(compiled, state, frozen, batch, 1)
            times += step_times
    for form, (_, _, times) in programs.items():
        if times:
            print(f"  {form}: step seconds over {steps}: min {min(times):.3f}, median {float(np.median(times)):.3f}")


def anonymous_mb() -> float:
    """This process's anonymous resident memory (MB) once malloc has handed its free heap back."""
    import gc

    from lowrax.train.host_memory import release_freed_host_memory

    gc.collect()
    release_freed_host_memory()
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024


def op_time_by_kind(compiled, state, frozen, batch, steps: int = 3) -> list[tuple[str, float, int]]:
    """(op kind, milliseconds per step, ops per step) from a jax.profiler trace, largest first."""
    trace_dir = tempfile.mkdtemp(prefix="lowrax-profile-")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    run_steps(compiled, state, frozen, batch, steps)
    jax.profiler.stop_trace()
    events = json.load(gzip.open(sorted(glob.glob(f"{trace_dir}/**/*.json.gz", recursive=True))[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:  # XLA's thunks; the Python frames ($...) and the executor's own spans are left out
        if e.get("ph") == "X" and not e["name"].startswith(("$", "ThunkExecutor", "SlinkyThreadPool", "end: ")):
            kind = re.sub(r"\.\d+$", "", e["name"])
            total[kind] += e.get("dur", 0)
            count[kind] += 1
    return [(kind, us / steps / 1e3, count[kind] // steps) for kind, us in total.most_common()]


if __name__ == "__main__":
    relaunch_with_huge_pages()  # the malloc `lowrax train` runs with
    parser = argparse.ArgumentParser()
    parser.add_argument("method", nargs="?", default="lora", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--blocks", nargs="+", choices=("default", "none", "all"), default=["default"])
    parser.add_argument("--classifier", action="store_true", help="the MiniLM sentiment recipe's step")
    parser.add_argument("--time", type=int, default=0, metavar="N", help="time N steps of the compiled program")
    parser.add_argument("--profile", action="store_true", help="op time by kind over three traced steps")
    parser.add_argument("--resident", action="store_true", help="resident memory the compiled step keeps")
    parser.add_argument("--lora-forms", action="store_true", help="LoRA as two matmuls vs one, steps taken in turn")
    args = parser.parse_args()
    if args.classifier:
        shape = (args.batch or 16, args.seq or 128)
        model, trainable, frozen, batch = classifier_step(*shape)
        label = f"classifier (MiniLM LoRA r 8 q/v), batch {shape[0]} x {shape[1]}"
    else:
        shape = (args.batch or 16, args.seq or 32)
        model, trainable, frozen, batch = causal_lm_step(args.method, *shape)
        label = f"{args.method}, batch {shape[0]} x {shape[1]}"
    if args.lora_forms:
        compare_lora_forms(model, trainable, frozen, batch, args.time)
        raise SystemExit(0)
    default = layers.ATTENTION_WHOLE_LIMIT
    for blocks in args.blocks:
        layers.ATTENTION_WHOLE_LIMIT = {"default": default, "none": 1 << 62, "all": 0}[blocks]
        compiled, optimizer = compiled_step(model, trainable, frozen, batch)
        m = compiled.memory_analysis()
        print(f"{label}, blocks {blocks}: compiled step temporaries {m.temp_size_in_bytes / 1e9:.2f} GB"
              f" + arguments {m.argument_size_in_bytes / 1e9:.2f} GB", flush=True)
        if args.resident:  # after one step, with the executable held and dropped
            state, _ = run_steps(compiled, init_state(jax.tree.map(jnp.copy, trainable), optimizer), frozen, batch, 1)
            del state
            held = anonymous_mb()
            del compiled
            dropped = anonymous_mb()
            print(f"  resident: {held:.0f} MB with the step's executable, {dropped:.0f} MB without it "
                  f"({held - dropped:.0f} MB held by the executable)", flush=True)
            continue
        if not (args.time or args.profile):
            continue
        # the state copies the trainable arrays: the step donates its state, and the next setting needs them
        state, _ = run_steps(compiled, init_state(jax.tree.map(jnp.copy, trainable), optimizer), frozen, batch, 1)
        if args.time:
            state, times = run_steps(compiled, state, frozen, batch, args.time)
            print(f"  step seconds over {args.time}: min {min(times):.3f}, median {float(np.median(times)):.3f}")
        if args.profile:
            for kind, ms, ops in op_time_by_kind(compiled, state, frozen, batch)[:15]:
                print(f"  {ms:9.1f} ms  {ops:5d} ops  {kind}")
