"""AdaLoRA's rank allocator (PEFT's `RankAllocator` and `update_and_allocate`), as one pure
rule applied after every optimizer step to all AdaLoRA nodes at once.

With g the step's index counting from 0 (PEFT's `global_step`) and T = total_step - tfinal:

    g < T    every entry w of P, e, Q gets its sensitivity I = |w * grad|, smoothed
             I' = beta1 I' + (1 - beta1) I, and its uncertainty U' = beta2 U' + (1 - beta2) |I - I'|;
             when g > tinit and g % deltaT == 0, the triplets are ranked by
             s = I'U'(e) + mean_in I'U'(P) + mean_out I'U'(Q) across every layer, the lowest
             init_budget - budget(g) of them (and ties with the last) are pruned (e = 0), the
             rest kept; budget(g) falls from init_r x layers to target_r x layers as a cubic
    g == T   the same ranking on the smoothed scores as they stand, at the target budget; then
             the smoothed scores are reset
    g > T    the kept pattern is fixed; pruned e are set to 0 after every step

Pruned triplets keep training between allocations (only e is zeroed), exactly as PEFT's
in-place masking. Everything has fixed shapes and depends on g only through traced
values, so the jitted step compiles once for the whole schedule.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lowrax.errors import LowraxError


def budget_table(init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int) -> np.ndarray:
    """PEFT's `budget_schedule` for g = 0..total_step, computed in float64 as PEFT does (so the
    integer budgets are PEFT's exactly)."""
    out = np.empty(total_step + 1, np.int32)
    for g in range(total_step + 1):
        if g <= tinit:
            out[g] = init_budget
        elif g > total_step - tfinal:
            out[g] = target_budget
        else:
            falling = 1 - (g - tinit) / (total_step - tfinal - tinit)
            out[g] = int((init_budget - target_budget) * (falling ** 3) + target_budget)
    return out


def _smoothed(node, grad, name: str, beta1: float, beta2: float):
    """(I', U') of one field after this step's sensitivity |w * grad|."""
    w = getattr(node, name).astype(jnp.float32)
    g = getattr(grad, name)
    g = jnp.zeros_like(w) if g is None else g.astype(jnp.float32)
    sensitivity = jnp.abs(w * g)
    ipt = beta1 * getattr(node, "ipt_" + name) + (1 - beta1) * sensitivity
    unc = beta2 * getattr(node, "unc_" + name) + (1 - beta2) * jnp.abs(sensitivity - ipt)
    return ipt, unc


def triplet_scores(node) -> jnp.ndarray:
    """[r]: each triplet's importance, PEFT's `_combine_ipt` of the element scores I' x U'."""
    score_e = node.ipt_e * node.unc_e
    score_a = jnp.mean(node.ipt_a * node.unc_a, axis=0)
    score_b = jnp.mean(node.ipt_b * node.unc_b, axis=1)
    return score_e + (score_a + score_b)


def allocate(nodes: list, grads: list, step) -> list:
    """The rule after optimizer step number `step` (1-based; g = step - 1). nodes: every
    AdaLoRA node of the tree, updated parameters; grads: the gradients of that step."""
    schedules = {n.schedule for n in nodes}
    if len(schedules) != 1:
        raise LowraxError("AdaLoRA nodes of one tree must share one schedule (one AdaLoraConfig); "
                          f"found {len(schedules)} different ones")
    s = schedules.pop()
    init_budget = sum(n.rank for n in nodes)
    table = jnp.asarray(budget_table(init_budget, s.target_r * len(nodes), s.tinit, s.tfinal, s.total_step))
    limit = s.total_step - s.tfinal
    g = jnp.asarray(step, jnp.int32) - 1
    updating, final_point, after_final = g < limit, g == limit, g > limit
    allocating = (updating & (g > s.tinit) & (g % s.deltaT == 0)) | final_point

    smoothed = []
    for node, grad in zip(nodes, grads):
        fields = {}
        for name in ("a", "e", "b"):
            ipt, unc = _smoothed(node, grad, name, s.beta1, s.beta2)
            fields["ipt_" + name] = jnp.where(updating, ipt, getattr(node, "ipt_" + name))
            fields["unc_" + name] = jnp.where(updating, unc, getattr(node, "unc_" + name))
        smoothed.append(node.replace(**fields))

    scores = [triplet_scores(n) for n in smoothed]
    pruned_count = init_budget - table[jnp.clip(g, 0, s.total_step)]
    # torch.kthvalue(k = pruned_count): the k-th smallest score; it and every score below are pruned
    threshold = jnp.sort(jnp.concatenate(scores))[jnp.clip(pruned_count - 1, 0, init_budget - 1)]

    out = []
    for node, score in zip(smoothed, scores):
        kept = jnp.where(allocating, (score > threshold).astype(jnp.float32), node.kept)
        masking = allocating | after_final
        e = jnp.where(masking & (kept == 0), jnp.zeros_like(node.e), node.e)
        reset = {f: jnp.where(final_point, jnp.zeros_like(getattr(node, f)), getattr(node, f))
                 for f in ("ipt_a", "ipt_e", "ipt_b", "unc_a", "unc_e", "unc_b")}
        out.append(node.replace(e=e, kept=kept, **reset))
    return out
