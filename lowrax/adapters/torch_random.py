"""torch's seeded permutations, reproduced with numpy, for methods whose PEFT layers draw fixed
positions from a seed and save only the seed (FourierFT's spectrum positions, SHiRA's mask).

`torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU is a Fisher-Yates
shuffle driven by a 32-bit Mersenne Twister seeded the classic way (`init_genrand`): step i swaps
position i with i + (next 32-bit draw mod (n - i)). numpy's MT19937 with its legacy seeding is that
generator, so the same draws give the same permutation without torch. Only the first `count`
positions are computed (a shuffle never touches a position again once it has passed it), which keeps
a permutation of a large weight matrix's positions cheap.
"""

from __future__ import annotations

import numpy as np

# The seed a fresh `torch.Generator()` starts from (PEFT's SHiRA with random_seed=None uses one).
TORCH_DEFAULT_SEED = 67280421310721


def torch_randperm_head(n: int, count: int, seed: int) -> np.ndarray:
    """The first `count` entries of torch's CPU `randperm(n)` from a generator seeded with `seed` (int64)."""
    if not 0 <= count <= n:
        raise ValueError(f"count must lie in [0, {n}], got {count}")
    if n >= 2**32 // 20:  # torch switches to 64-bit draws there; no weight matrix here is that large
        raise ValueError(f"permutations of {n} positions are not reproduced (torch draws 64-bit numbers there)")
    bits = np.random.MT19937(0)
    bits._legacy_seeding(seed & 0xFFFFFFFF)
    draws = bits.random_raw(min(count, n - 1)) if count else np.zeros(0, np.uint64)
    moved: dict[int, int] = {}  # positions the shuffle has written, beyond the identity
    head = np.empty(count, np.int64)
    for i in range(count):
        if i == n - 1:  # torch's last step draws nothing: the remaining position stays
            head[i] = moved.get(i, i)
            break
        j = i + int(draws[i]) % (n - i)
        head[i] = moved.get(j, j)
        moved[j] = moved.get(i, i)
    return head
