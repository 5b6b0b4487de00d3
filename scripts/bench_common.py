"""Helpers shared by the benchmark scripts: timing, the torch reference model, JSON output."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: model, batch shape, JSON output."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    return ap


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls (fn must block until done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timed(fn) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_torch_causal_lm(path):
    """The transformers (torch, float32) model for the same checkpoint lowrax loads from `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowrax.models.pretrained import resolve_model_path

    source = resolve_model_path(path)
    if source.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)


def emit(result: dict, out: str | None) -> None:
    """Print the result as JSON and, when asked, write it to `out` (whole or not at all)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        partial = Path(f"{out}.partial")
        partial.write_text(text + "\n")
        partial.replace(out)


def command_line(mode: str) -> str:
    """This benchmark's command as a reader reruns it from the repository root; `mode` is the flag that
    `scripts/bench.py` dispatches on (it removes the flag before the benchmark parses its arguments; "" for
    its own forward and generation benchmark)."""
    import sys

    script = Path(sys.argv[0]).name
    head = ["scripts/bench.py", *([mode] if mode else [])] if script == "bench.py" else [f"scripts/{script}"]
    return " ".join([".venv-test/bin/python", *head, *sys.argv[1:]])


def machine_facts(packages=("jax", "torch", "transformers", "peft")) -> dict:
    """What the figures were measured on (the docs' performance page prints it under each table): date,
    platform, cores, Python, the installed versions of `packages`, and the checkout's commit."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"date": datetime.date.today().isoformat(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "versions": versions, "commit": measured_commit()}


def measured_commit() -> str | None:
    """The checkout's commit (with "+changes" when its tracked files differ), or None outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return None
    dirty = git("diff", "--quiet", "HEAD").returncode != 0
    return head.stdout.strip() + ("+changes" if dirty else "")


# Llama-architecture configs for timing without a checkpoint (random weights).
RANDOM_LLAMA = {
    # Llama-3.2-1B's shape: 1.24 B parameters with tied embeddings.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=4096),
    # A few MB, to check the benchmark itself on a CPU.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512),
}

# Dense bf16 tensor-core peaks (FLOP/s) by jax device_kind prefix, from the vendors' data sheets.
PEAK_BF16_FLOPS = {"NVIDIA H100": 989.4e12, "NVIDIA H200": 989.4e12, "NVIDIA A100": 312e12}


def device_peak_flops() -> float | None:
    """The accelerator's dense bf16 peak, for MFU; None on a CPU or an unknown device."""
    import jax

    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_FLOPS.items() if kind.startswith(k)), None)


def random_llama(preset: str, dtype, mesh):
    """(model, params) of a random Llama of the preset's shape, created already sharded on `mesh`."""
    import jax

    from lowrax.models import model_from_hf_config
    from lowrax.dist.sharding import param_shardings

    model = model_from_hf_config(dict(RANDOM_LLAMA[preset], model_type="llama"))
    shapes = model.param_shapes()
    leaves, treedef = jax.tree.flatten(shapes)

    def init(key):
        keys = jax.random.split(key, len(leaves))
        return treedef.unflatten([(0.02 * jax.random.normal(k, s.shape)).astype(dtype) for k, s in zip(keys, leaves)])

    return model, jax.jit(init, out_shardings=param_shardings(shapes, model, mesh))(jax.random.key(0))


def in_fresh_process(fn, *args):
    """fn(*args) in a new (spawned) process, so that its peak memory is its own; fn must be a module-level
    function (it is pickled by name) and its result picklable."""
    import multiprocessing
    from queue import Empty

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call_into, args=(queue, fn, args))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():  # it raised (its traceback is above) or was killed
                raise RuntimeError(f"{getattr(fn, '__name__', fn)} ended without a result "
                                   f"(exit code {proc.exitcode})") from None
    proc.join()
    return result


def _call_into(queue, fn, args):
    queue.put(fn(*args))
