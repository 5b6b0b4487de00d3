"""float32 matmul speed of XLA (this process's XLA_FLAGS) and of torch on the recipes' projection shapes:
the ceiling a training step of equal FLOPs runs against on this CPU.

    .venv-test/bin/python scripts/gemm_rates.py
    XLA_FLAGS=--xla_cpu_use_onednn=true .venv-test/bin/python scripts/gemm_rates.py --no-torch

Shapes [rows, in] @ [in, out]: MiniLM's FFN at 16 x 128 tokens (both directions), SmolLM2's MLP and
vocabulary head at 4 x 256 tokens. Best of 20 calls after a warm-up, GFLOP/s.
"""

import argparse
import time

SHAPES = [(2048, 384, 1536), (2048, 1536, 384), (1024, 576, 1536), (1024, 576, 49152)]


def best_seconds(fn, repeats: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp

    product = jax.jit(lambda x, w: x @ w)
    for m, k, n in SHAPES:
        flops = 2 * m * k * n
        x, w = jnp.ones((m, k)), jnp.ones((k, n))
        line = f"[{m}, {k}] @ [{k}, {n}]: XLA {flops / best_seconds(lambda: product(x, w).block_until_ready()) / 1e9:.0f}"
        if not args.no_torch:
            import torch

            tx, tw = torch.ones(m, k), torch.ones(k, n)
            line += f", torch {flops / best_seconds(lambda: tx @ tw) / 1e9:.0f} ({torch.get_num_threads()} threads)"
        print(line + " GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
