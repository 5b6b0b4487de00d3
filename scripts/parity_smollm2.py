"""How far lowrax's SmolLM2 logits are from transformers', next to transformers' own spread.

    .venv-test/bin/python scripts/parity_smollm2.py

Prints JSON: max |logit difference| over the real tokens of a small padded batch for
lowrax vs transformers (sdpa and eager attention), sdpa vs eager, and each float32
run vs transformers run in float64 (`model.double()`; its RMSNorm still upcasts to
float32 internally, so this is a better reference, not an exact one), and the same for
lowrax with XLA's plain dot (no blocked accumulation, see lowrax/ops.py). Needs the test extra.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import AutoModelForCausalLM

import lowrax
from lowrax.core import linear as ops
from lowrax.models.pretrained import EMBEDDED_FILE

PROMPTS = ["The capital of France is", "Hello, my name is Ada and I"]


def main() -> None:
    model, params = lowrax.load_pretrained(None, progress=False)
    tokenizer = lowrax.load_tokenizer(None)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    valid = mask.astype(bool)
    ours = np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids), jnp.asarray(mask)))
    # The same forward with XLA's plain dot everywhere (no blocked accumulation, see lowrax.core.linear).
    blocked = ops.ACCUMULATION_BLOCK
    ops.ACCUMULATION_BLOCK = 1 << 30
    try:
        unblocked = np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids), jnp.asarray(mask)))
    finally:
        ops.ACCUMULATION_BLOCK = blocked

    def reference(attn: str, double: bool = False) -> np.ndarray:
        hf = AutoModelForCausalLM.from_pretrained(str(lowrax.embedded_model_path().parent), gguf_file=EMBEDDED_FILE,
                                                  dtype=torch.float32, attn_implementation=attn).eval()
        if double:
            hf = hf.double()
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        with torch.no_grad():
            return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(positions)).logits.double().numpy()

    sdpa, eager, f64 = reference("sdpa"), reference("eager"), reference("eager", double=True)

    def gap(a, b):
        return float(np.abs(a[valid] - b[valid]).max())

    print(json.dumps({
        "max_abs_logit": float(np.abs(sdpa[valid]).max()),
        "lowrax_vs_transformers_sdpa": gap(ours, sdpa),
        "lowrax_vs_transformers_eager": gap(ours, eager),
        "transformers_sdpa_vs_eager": gap(sdpa, eager),
        "transformers_fp32_vs_fp64": gap(eager, f64),
        "lowrax_fp32_vs_transformers_fp64": gap(ours, f64),
        "lowrax_plain_xla_dot_vs_transformers_sdpa": gap(unblocked, sdpa),
        "lowrax_plain_xla_dot_fp32_vs_transformers_fp64": gap(unblocked, f64),
    }, indent=2))


if __name__ == "__main__":
    main()
