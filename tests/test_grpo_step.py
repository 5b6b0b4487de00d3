"""One GRPO update equals TRL's: the same completions, advantages and LoRA adapter on a tiny Llama, the loss
through TRL 1.16's own GRPOTrainer._compute_loss on the PEFT model (its reference: the adapter disabled) and
one AdamW step with its gradient clipping, against lowrax's per-token log-probs, `grpo_loss` and the same
optimizer; the updated adapters agree."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from safetensors.numpy import load_file

import lowrax
from lowrax.objectives.logps import completion_token_logps
from tests.conftest import TINY_LLAMA, hf_model_dir

torch, peft, trl, transformers = (pytest.importorskip(name, reason=f"GRPO parity needs {name} (pip install -e .[test])")
                                  for name in ("torch", "peft", "trl", "transformers"))

PROMPT, COMPLETION, ROWS, LR = 5, 6, 4, 1e-2
# Adam's first step moves each weight by about lr x sign(gradient); a gradient that is 0 up to rounding could
# go either way on either side, so a larger epsilon keeps the comparison continuous in the gradient.
ADAM_EPS = 1e-3


def completions(seed: int = 0):
    """Prompts of one length (no left padding) and right-padded completions with their mask."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, 128, (ROWS, PROMPT))
    completion = rng.integers(3, 128, (ROWS, COMPLETION))
    mask = (np.arange(COMPLETION) < np.array([[6], [2], [4], [5]])).astype(np.int64)
    advantages = np.asarray(lowrax.group_advantages([1.0, 0.0, 0.2, 0.9], num_generations=2))
    return prompt, completion, mask, advantages


def trl_update(path, adapter, tmp_path, loss_type, beta):
    """The PEFT adapter's tensors after one TRL update (loss by GRPOTrainer._compute_loss)."""
    from datasets import Dataset

    prompt, completion, mask, advantages = completions()
    policy = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                            adapter, is_trainable=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(lowrax.embedded_minilm_path()))
    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=ROWS,
                          num_generations=2, max_completion_length=COMPLETION, learning_rate=LR, beta=beta,
                          loss_type=loss_type, weight_decay=0.0, max_grad_norm=1.0, adam_epsilon=ADAM_EPS,
                          bf16=False)  # TRL defaults to bf16 autocast; the comparison is in float32
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                              args=args, train_dataset=Dataset.from_dict({"prompt": ["a b"] * ROWS}),
                              processing_class=tokenizer)
    model = trainer.model
    if "ref" in model.peft_config:  # TRL copies an adapter it is given as the reference; ours is the base
        model.delete_adapter("ref")
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    ids = torch.tensor(np.concatenate([prompt, completion], 1))
    attention = torch.ones_like(ids)
    attention[:, PROMPT:] = torch.tensor(mask)
    inputs = {"prompt_ids": torch.tensor(prompt), "prompt_mask": torch.ones((ROWS, PROMPT), dtype=torch.long),
              "completion_ids": torch.tensor(completion), "completion_mask": torch.tensor(mask),
              "advantages": torch.tensor(advantages), "num_items_in_batch": torch.tensor(float(mask.sum()))}
    if beta:
        with torch.no_grad(), model.disable_adapter():
            inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                model, ids, attention, COMPLETION)
    optimizer = trainer.create_optimizer()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
    optimizer.step()
    model.save_pretrained(tmp_path / "after")
    return float(loss.detach()), load_file(str(tmp_path / "after" / "adapter_model.safetensors"))


def lowrax_update(path, adapter, tmp_path, loss_type, beta):
    prompt, completion, mask, advantages = completions()
    model, params = lowrax.load_pretrained(path, progress=False)
    params = lowrax.load_peft(params, adapter, model)
    trainable, frozen = lowrax.split(params)
    def token_logps(tree):
        return completion_token_logps(model, tree, jnp.asarray(prompt), jnp.ones(prompt.shape, jnp.int32),
                                      jnp.asarray(completion), jnp.asarray(mask))

    ref = token_logps(lowrax.adapters_off(params)) if beta else None

    def loss_of(t):
        return lowrax.grpo_loss(token_logps(lowrax.combine(t, frozen)), None, advantages, mask, ref_logps=ref,
                                loss_type=loss_type, beta=beta, max_completion_length=COMPLETION,
                                num_items_in_batch=mask.sum())[0]

    loss, grads = jax.value_and_grad(loss_of)(trainable)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, b1=0.9, b2=0.999, eps=ADAM_EPS,
                                                                         weight_decay=0.0))
    updates, _ = optimizer.update(grads, optimizer.init(trainable), trainable)
    lowrax.save_peft(lowrax.combine(optax.apply_updates(trainable, updates), frozen), tmp_path / "ours", model)
    return float(loss), load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = hf_model_dir(tmp_path_factory, "grpo-llama",
                           lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)))
    torch.manual_seed(2)
    policy = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    adapter = tmp_path_factory.mktemp("grpo-adapter")
    policy.save_pretrained(adapter)
    return path, adapter


@pytest.mark.parametrize("loss_type, beta", [("dapo", 0.0), ("grpo", 0.04), ("dr_grpo", 0.0)])
def test_one_update_equals_trl(tiny, tmp_path, loss_type, beta):
    path, adapter = tiny
    want_loss, want = trl_update(path, adapter, tmp_path / "trl", loss_type, beta)
    got_loss, got = lowrax_update(path, adapter, tmp_path / "lowrax", loss_type, beta)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-4, atol=1e-6)
    assert set(got) == set(want)
    before = load_file(str(adapter / "adapter_model.safetensors"))
    for key in want:
        assert not np.allclose(want[key], before[key])  # the step moved every tensor
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_completion_log_probs_after_left_padded_prompts_equal_each_row_alone(tiny):
    """Prompts of different lengths, left-padded, and right-padded completions: each completion token's
    log-prob equals the one from the row run alone, unpadded, through the whole logits."""
    path, adapter = tiny
    model, params = lowrax.load_pretrained(path, progress=False)
    params = lowrax.load_peft(params, adapter, model)
    rng = np.random.default_rng(5)
    prompt_lengths, completion_lengths = [5, 2, 4], [3, 6, 1]
    prompt = np.zeros((3, 5), np.int32)
    prompt_mask = np.zeros((3, 5), np.int32)
    completion = rng.integers(3, 128, (3, 6)).astype(np.int32)
    completion_mask = (np.arange(6) < np.array(completion_lengths)[:, None]).astype(np.int32)
    for row, n in enumerate(prompt_lengths):
        prompt[row, 5 - n:] = rng.integers(3, 128, n)
        prompt_mask[row, 5 - n:] = 1
    got = np.asarray(completion_token_logps(model, params, *map(jnp.asarray, (prompt, prompt_mask, completion,
                                                                             completion_mask))))
    for row, (n, m) in enumerate(zip(prompt_lengths, completion_lengths)):
        alone = np.concatenate([prompt[row, 5 - n:], completion[row, :m]])[None]
        logits = model.apply(params, jnp.asarray(alone))[0, n - 1: n + m - 1]
        want = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))[np.arange(m), completion[row, :m]]
        np.testing.assert_allclose(got[row, :m], want, rtol=1e-5, atol=1e-5)
