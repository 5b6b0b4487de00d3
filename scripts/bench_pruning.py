"""SparseGPT's time and memory per layer, printed as JSON.

    python scripts/bench.py --pruning [--patterns unstructured,2:4] [--repeats 3] [--out F]

For each linear kernel of one transformer layer of the model (default: the embedded
SmolLM2-135M-Instruct, float32): the SparseGPT solve on a random Hessian of full rank
(2048 calibration tokens), its time (best of repeats, compile excluded) and the compiled
program's memory (arguments + outputs + temporaries, XLA's memory analysis), then the
layer's totals. Calibration memory is separate: the layer-wise driver holds one chunk of
rows on the device (`chunk_rows`) and the layer outputs waiting for the next layer on the host.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_common import base_parser, best_of, command_line, emit, machine_facts  # noqa: E402

import lowrax  # noqa: E402
from lowrax.pruning import masks  # noqa: E402
from lowrax.pruning.sparsegpt import sparsegpt  # noqa: E402


def layer_solves(model, params, pattern: str, sparsity: float, tokens: int, repeats: int) -> dict:
    """SparseGPT on each linear kernel of layer 0 with `pattern`: seconds, compile seconds, program MB."""
    layer = params["model"]["layers"]["0"]
    kernels = {f"{block}.{name}": layer[block][name]["kernel"] for block in ("self_attn", "mlp")
               for name in layer[block]}
    n, m = masks.parse_pattern(pattern)
    rng = np.random.default_rng(0)
    out, total_s = {}, 0.0
    for name, kernel in sorted(kernels.items()):
        w = jnp.asarray(kernel).T
        x = jnp.asarray(rng.normal(size=(tokens, w.shape[1])).astype(np.float32))
        h = 2.0 / tokens * (x.T @ x)
        solve = lambda: jax.block_until_ready(sparsegpt(w, h, sparsity=sparsity, n=n, m=m))  # noqa: E731
        start = time.perf_counter()
        solve()
        compile_s = time.perf_counter() - start
        seconds = best_of(solve, repeats)
        compiled = jax.jit(lambda w, h: sparsegpt(w, h, sparsity=sparsity, n=n, m=m)).lower(w, h).compile()
        mem = compiled.memory_analysis()
        held = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        out[name] = {"out_in": list(w.shape), "seconds": round(seconds, 4), "compile_s": round(compile_s, 2),
                     "program_mb": round(held / 2**20, 2)}
        total_s += seconds
    return {"kernels": out, "layer_seconds": round(total_s, 3),
            "layer_peak_program_mb": max(v["program_mb"] for v in out.values()),
            "model_seconds_estimate": round(total_s * model.config.num_layers, 1)}


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--patterns", default="unstructured,2:4", help="comma-separated: unstructured, N:M")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, params = lowrax.load_pretrained(args.model, progress=False)
    emit({"model": str(args.model or "embedded SmolLM2-135M-Instruct"), "sparsity": args.sparsity,
          "hessian_tokens": args.tokens, "repeats": args.repeats, "model_layers": model.config.num_layers,
          "command": command_line("--pruning"), "machine": machine_facts(("jax",)),
          "patterns": {p: layer_solves(model, params, p, args.sparsity, args.tokens, args.repeats)
                       for p in args.patterns.split(",")}}, args.out)


if __name__ == "__main__":
    main()
