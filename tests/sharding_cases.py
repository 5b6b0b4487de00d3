"""Sharded training on 8 virtual CPU devices equals the single-device run; shardings follow the rules.

Run by tests/test_sharding.py in a child pytest whose XLA_FLAGS give it 8 CPU devices
(the rest of the suite keeps one device); by hand:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/sharding_cases.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import lowrax
from lowrax.errors import LowraxError
from lowrax.models import model_from_hf_config
from lowrax.train.optim import OptimizerConfig, make_optimizer
from lowrax.dist.parallel import global_batch, sharded_train_step
from lowrax.dist.sharding import MeshConfig, make_mesh, param_shardings, state_shardings
from lowrax.train.config import load_config
from lowrax.train.trainer import run_training
from lowrax.train.step import init_state
from tests.test_training_run import data_file, overrides, tiny_dir as tiny_run_dir  # noqa: F401 - fixtures

if jax.device_count() < 8:
    raise RuntimeError("tests/sharding_cases.py needs 8 devices: run it with "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharding.py does)")

CONFIG = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
MESHES = {"data8": MeshConfig(data=8), "fsdp4-data2": MeshConfig(data=2, fsdp=4),
          "tensor2-fsdp2-data2": MeshConfig(data=2, fsdp=2, tensor=2)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny llama as an HF directory (safetensors), so loading into shards is exercised."""
    model = model_from_hf_config(CONFIG)
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("shard-llama")
    save_file({t.hf_key: (0.2 * rng.normal(size=t.hf_shape)).astype(np.float32) for t in model.tensors()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path


def batches(steps, b=8, t=16):
    """Causal-LM batches that also carry seq2seq targets (`labels`, with the same loss_mask) for T5."""
    rng, targets = np.random.default_rng(0), np.random.default_rng(1)
    out = []
    for _ in range(steps):
        mask = np.ones((b, t), np.int32)
        mask[:, : t // 4] = 0
        out.append({"input_ids": rng.integers(0, 128, (b, t)).astype(np.int32),
                    "attention_mask": np.ones((b, t), np.int32), "loss_mask": mask,
                    "labels": targets.integers(0, 128, (b, t)).astype(np.int32)})
    return out


def image_batches(steps, b=8):
    rng = np.random.default_rng(0)
    return [{"pixel_values": rng.normal(size=(b, 3, 16, 16)).astype(np.float32),
             "labels": rng.integers(0, 3, b).astype(np.int32)} for _ in range(steps)]


def run(tiny_dir, mesh, method, steps=3):
    """Losses and final trainable arrays of `steps` LoRA (or QLoRA) steps on `mesh`."""
    quant = {"qlora": lowrax.QuantConfig(blocksize=64), "int8": lowrax.QuantConfig(method="int8")}.get(method)
    model, base = lowrax.load_pretrained(tiny_dir, quantize=quant, mesh=mesh, progress=False)
    if method == "adalora":  # ranks allocated from one global budget across the sharded layers
        cfg = lowrax.AdaLoraConfig(init_r=4, target_r=2, total_step=steps, target_modules="all-linear")
    else:
        cfg = lowrax.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random")
    wrapped = lowrax.wrap(base, cfg, jax.random.key(1))
    trainable, frozen = lowrax.split(wrapped)
    # lr 1e-3: Adam normalises each update, so a rounding-level gradient difference on an
    # element whose gradient is near zero moves it by up to ~lr; keep that below the tolerance.
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    step, state, frozen = sharded_train_step(model, optimizer, mesh, init_state(trainable, optimizer), frozen)
    losses = []
    for batch in image_batches(steps) if model.is_image_model else batches(steps):
        state, metrics = step(state, frozen, global_batch(mesh, batch))
        losses.append(float(metrics["loss"]))
    return model, base, state, frozen, losses, optimizer


def assert_follows_rules(trees, model, mesh):
    for tree in trees:
        expected = param_shardings(tree, model, mesh)
        for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(expected)):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.shape, leaf.sharding, sharding)


@pytest.mark.parametrize("method, mesh_name", [(m, name) for m in ("lora", "qlora") for name in sorted(MESHES)]
                         + [("int8", "tensor2-fsdp2-data2")])
def test_sharded_steps_equal_single_device_and_follow_the_rules(tiny_dir, mesh_name, method):
    single = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    _, _, ref_state, _, ref_losses, _ = run(tiny_dir, single, method)
    mesh = make_mesh(MESHES[mesh_name])
    model, base, state, frozen, losses, optimizer = run(tiny_dir, mesh, method)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    assert losses[-1] < losses[0]
    for ours, ref in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(ref_state.trainable)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
    # Every leaf carries the sharding the rules give it: parameters, adapters, NF4 blocks, optimizer state.
    assert_follows_rules((state.trainable, frozen, base), model, mesh)
    expected = state_shardings(jax.eval_shape(lambda s: s, state), param_shardings(state.trainable, model, mesh),
                               optimizer, mesh)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.shape, leaf.sharding, sharding)
    # ... and Adam's moments are split exactly like the parameter they belong to.
    import optax

    for moment in ("mu", "nu"):
        moments, params = jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, moment)), jax.tree.leaves(state.trainable)
        assert len(moments) == len(params)
        for m, p in zip(moments, params):
            assert m.shape == p.shape and m.sharding.is_equivalent_to(p.sharding, p.ndim)
    if method == "int8":  # the 8-bit codes [out, in] split as the kernel's transpose
        codes = frozen["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].base.codes
        assert codes.dtype == jnp.int8 and codes.sharding.spec == P("tensor", "fsdp")
    q_a = state.trainable["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].a
    assert q_a.sharding.spec == (P("fsdp", None) if mesh.shape["fsdp"] > 1 else P(None, None))


def test_adalora_allocates_the_same_ranks_sharded(tiny_dir):
    single = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    _, _, ref_state, _, ref_losses, _ = run(tiny_dir, single, "adalora")
    _, _, state, _, losses, _ = run(tiny_dir, make_mesh(MESHES["tensor2-fsdp2-data2"]), "adalora")
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    kept = [n.kept for n in jax.tree.leaves(state.trainable, is_leaf=lambda x: isinstance(x, lowrax.AdaLoraKernel))
            if isinstance(n, lowrax.AdaLoraKernel)]
    assert 0 < sum(float(k.sum()) for k in kept) < 4 * len(kept)  # an allocation happened
    for ours, ref in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(ref_state.trainable)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)


def test_rules_give_megatron_and_fsdp_splits(tiny_dir):
    mesh = make_mesh(MESHES["tensor2-fsdp2-data2"])
    model, params = lowrax.load_pretrained(tiny_dir, mesh=mesh, progress=False)
    layer = params["model"]["layers"]["0"]
    assert layer["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")  # column parallel
    assert layer["self_attn"]["o_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")  # row parallel
    assert layer["mlp"]["down_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert params["model"]["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert layer["input_layernorm"]["scale"].sharding.is_fully_replicated
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=4, target_modules=("q_proj",), variant="dora"), jax.random.key(0))
    node = param_shardings(wrapped, model, mesh)["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert node.a.spec == P("fsdp", None) and node.b.spec == P(None, "tensor") and node.magnitude.spec == P("tensor")
    quantized = lowrax.load_pretrained(tiny_dir, mesh=mesh, quantize=lowrax.QuantConfig(), progress=False)[1]
    q = quantized["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q.packed.sharding.spec == P("fsdp") and q.absmax.sharding.spec == P("fsdp")
    assert q.packed.addressable_shards[0].data.shape == (64 * 64 // 2 // 2,)  # each device holds its half of the codes


def test_mesh_that_does_not_fit_the_devices_names_both_numbers():
    with pytest.raises(LowraxError, match=r"mesh data=3 x fsdp=1 x tensor=1 needs 3 devices, but 8 are available"):
        make_mesh(MeshConfig(data=3))
    with pytest.raises(LowraxError, match=r"fsdp=3 x tensor=1 = 3 devices does not divide the 8 devices"):
        make_mesh(MeshConfig(fsdp=3))


def test_axis_that_does_not_divide_a_dimension_names_both_numbers(tiny_dir):
    model, params = lowrax.load_pretrained(tiny_dir, progress=False)
    mesh = make_mesh(MeshConfig(data=1, tensor=8))
    bad = dict(params, lm_head={"kernel": jnp.zeros((64, 100))})
    with pytest.raises(LowraxError, match=r"lm_head/kernel: dimension 100 \(logical axis 'vocab'\) is not divisible by "
                                          r"mesh axis tensor of size 8"):
        param_shardings(bad, model, mesh)
    with pytest.raises(LowraxError, match=r"batch size 6 is not divisible by mesh data x fsdp = 8"):
        global_batch(make_mesh(MeshConfig(data=8)), batches(1, b=6)[0])


WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def run_two_processes(config_overrides: list[str]) -> list[dict]:
    """`lowrax train` in two local processes of 4 CPU devices each, joined by jax.distributed."""
    flags = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=4")  # the rest kept
    env = dict(os.environ, XLA_FLAGS=flags,
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(WORKER.parent.parent))
    args = json.dumps(config_overrides)
    procs = [subprocess.Popen([sys.executable, str(WORKER), args], env=dict(env, JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


def test_two_processes_match_one_process_and_checkpoint_restores(tiny_run_dir, data_file, tmp_path):  # noqa: F811
    tiny_dir = tiny_run_dir
    settings = {"lora.dropout": 0.0, "train.batch_size": 8, "mesh.fsdp": 2, "train.eval_examples": 2}
    multi, single = tmp_path / "multi", tmp_path / "single"
    reports = run_two_processes(overrides(tiny_dir, data_file, multi, 4, **settings))
    assert [(r["processes"], r["devices"], r["local_devices"]) for r in reports] == [(2, 8, 4)] * 2
    # Resumed by two processes from the checkpoint they wrote together, two more steps.
    run_two_processes(overrides(tiny_dir, data_file, multi, 6, **settings))

    # The same run in this one process, on its 8 devices with the same mesh, uninterrupted.
    run_training(load_config(None, overrides(tiny_dir, data_file, single, 6, **settings)), progress=False,
                 log=lambda *_: None)
    assert len(losses(multi)) == 6
    np.testing.assert_allclose(losses(multi), losses(single), atol=1e-5)
    # Process 0 scored and saved from the gathered weights: same metric and adapter as one process.
    summaries = [json.loads((d / "summary.json").read_text()) for d in (multi, single)]
    assert summaries[0]["metric_after"] == summaries[1]["metric_after"] and summaries[0]["processes"] == 2
    from safetensors.numpy import load_file

    ours, ref = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (multi, single))
    assert ours.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], atol=1e-5)

    from lowrax.train.runs import restore_run

    _, model, from_multi = restore_run(multi)
    _, _, from_single = restore_run(single)
    ids = np.array([[1, 50, 300, 7000, 12]])
    np.testing.assert_allclose(np.asarray(model.apply(from_multi, ids)), np.asarray(model.apply(from_single, ids)), atol=1e-5)


def test_generation_from_sharded_parameters_equals_unsharded(tiny_dir):
    mesh = make_mesh(MESHES["tensor2-fsdp2-data2"])
    model, sharded = lowrax.load_pretrained(tiny_dir, mesh=mesh, progress=False)
    _, plain = lowrax.load_pretrained(tiny_dir, progress=False)
    prompts = [[5, 9, 2, 7], [3, 1]]
    assert (lowrax.generate_ids(model, sharded, prompts, 6, eos_token_ids=(), pad_token_id=0)
            == lowrax.generate_ids(model, plain, prompts, 6, eos_token_ids=(), pad_token_id=0))


def test_distillation_teacher_split_over_the_data_axis(tiny_dir):
    """distill.teacher_sharding=data: the teacher's weights are split over data x fsdp (the student
    replicates over data), and the sharded distillation steps equal the single-device ones."""
    from lowrax.dist.sharding import TEACHER_RULES
    from lowrax.objectives.config import DistillSection
    from lowrax.objectives.step_losses import distill_objective
    from lowrax.train.data import gather_loss_positions

    def go(mesh, rules):
        model, base = lowrax.load_pretrained(tiny_dir, mesh=mesh, progress=False)
        teacher = lowrax.merge(lowrax.wrap(base, lowrax.LoraConfig(r=4, target_modules="all-linear", init="random"),
                                           jax.random.key(5)))
        wrapped = lowrax.wrap(base, lowrax.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"),
                              jax.random.key(1))
        trainable, frozen = lowrax.split(wrapped)
        optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
        step, state, frozen = sharded_train_step(model, optimizer, mesh, init_state(trainable, optimizer), frozen,
                                                 loss_fn=distill_objective(DistillSection(beta=0.5), model),
                                                 teacher=teacher, teacher_model=model, teacher_rules=rules)
        losses = []
        for batch in batches(2):
            batch.update(gather_loss_positions(batch["input_ids"], batch["loss_mask"], 12))
            state, metrics = step(state, frozen, global_batch(mesh, batch))
            losses.append(float(metrics["loss"]))
        return model, teacher, losses

    _, _, reference = go(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]), None)
    mesh = make_mesh(MeshConfig(data=4, fsdp=2))
    model, teacher, losses = go(mesh, TEACHER_RULES)
    np.testing.assert_allclose(losses, reference, atol=1e-5)
    q = param_shardings(teacher, model, mesh, TEACHER_RULES)["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q.spec[0] == ("data", "fsdp")  # the student's rules give "fsdp" alone


def test_grpo_steps_with_the_adapters_off_reference_equal_single_device(tiny_dir):
    """GRPO's step (the k3 KL against the base with adapters off, the sampling policy's log-probs stored)
    on a data x fsdp mesh equals one device's."""
    from lowrax.objectives.config import GRPOSection
    from lowrax.objectives.step_losses import grpo_objective

    rng = np.random.default_rng(0)
    rollouts = []
    for _ in range(2):
        prompt_mask = (np.arange(8) >= rng.integers(0, 6, (8, 1))).astype(np.int32)  # left-padded
        completion_mask = (np.arange(6) < rng.integers(1, 7, (8, 1))).astype(np.int32)
        rollouts.append({"prompt_ids": rng.integers(0, 128, (8, 8)).astype(np.int32) * prompt_mask,
                         "prompt_mask": prompt_mask, "completion_ids": rng.integers(0, 128, (8, 6)).astype(np.int32),
                         "completion_mask": completion_mask, "advantages": rng.normal(size=8).astype(np.float32),
                         "old_logps": rng.normal(-4.8, 0.05, (8, 6)).astype(np.float32)})

    def go(mesh):
        model, base = lowrax.load_pretrained(tiny_dir, mesh=mesh, progress=False)
        wrapped = lowrax.wrap(base, lowrax.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"),
                              jax.random.key(1))
        trainable, frozen = lowrax.split(wrapped)
        optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
        loss_fn = grpo_objective(GRPOSection(beta=0.1, loss_type="grpo", max_completion_length=6))
        step, state, frozen = sharded_train_step(model, optimizer, mesh, init_state(trainable, optimizer), frozen,
                                                 loss_fn=loss_fn)
        out = []
        for batch in rollouts:
            state, metrics = step(state, frozen, global_batch(mesh, batch))
            out.append([float(metrics[k]) for k in ("loss", "kl", "clip_ratio/region_mean")])
        return out

    reference = go(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    np.testing.assert_allclose(go(make_mesh(MeshConfig(data=4, fsdp=2))), reference, atol=1e-5)
    assert reference[1][1] > 0  # the reference term is live


NEW_FAMILIES = {"phi3": dict(CONFIG, model_type="phi3", partial_rotary_factor=0.5, pad_token_id=0),
                "gemma2": dict(CONFIG, model_type="gemma2", head_dim=16, sliding_window=4, query_pre_attn_scalar=16),
                "t5": {"model_type": "t5", "vocab_size": 128, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
                       "num_decoder_layers": 1, "num_heads": 4, "feed_forward_proj": "gated-gelu",
                       "tie_word_embeddings": False},
                "vit": {"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 128, "image_size": 16, "patch_size": 4,
                        "architectures": ["ViTForImageClassification"], "id2label": {"0": "a", "1": "b", "2": "c"}}}


@pytest.mark.parametrize("base", ["phi3", "gemma2", "t5", "vit", "pruned-llama"])
def test_new_families_and_pruned_bases_train_sharded_as_on_one_device(tiny_dir, tmp_path, base):
    """Phi-3 (fused projections), Gemma 2, T5 and a ViT classifier on NF4 bases (QLoRA), and a pruned base
    (SparseKernels, their masks split like their kernels) follow the rules and train on the mesh as on one device."""
    method = "lora" if base == "pruned-llama" else "qlora"
    if base in NEW_FAMILIES:
        config = NEW_FAMILIES[base]
        model = model_from_hf_config(config)
        rng = np.random.default_rng(0)
        path = tmp_path / base
        path.mkdir()
        save_file({t.hf_key: (0.2 * rng.normal(size=t.hf_shape)).astype(np.float32) for t in model.tensors()},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config))
    else:
        model, params = lowrax.load_pretrained(tiny_dir, progress=False)
        pruned, _ = lowrax.prune(params, model, method="magnitude", pattern="2:4", progress=False)
        path = lowrax.save_pretrained(pruned, model, tmp_path / "pruned")
    single = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    _, _, ref_state, _, ref_losses, _ = run(path, single, method)
    mesh = make_mesh(MESHES["tensor2-fsdp2-data2"])
    model, loaded, state, frozen, losses, _ = run(path, mesh, method)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    for ours, ref in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(ref_state.trainable)):
        # rtol as well: Adam divides each gradient element by its own scale, so where one is near zero
        # the mesh's different summation order can move that element's update by a part in 10^4
        # (T5 with its dropout: one element of 256 off by 2.8e-5 at a value of 0.106).
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-3)
    assert_follows_rules((state.trainable, frozen, loaded), model, mesh)
    if base == "pruned-llama":
        sparse = lowrax.sparse_modules(loaded)
        assert len(sparse) == 14
        up = sparse["model.layers.0.mlp.up_proj"]
        assert up.mask.sharding.is_equivalent_to(up.kernel.sharding, 2) and up.kernel.sharding.spec != P(None, None)
    elif base == "phi3":
        qkv = state.trainable["model"]["layers"]["0"]["self_attn"]["qkv_proj"]["kernel"]
        assert qkv.b.shape == (4, (4 + 2 * 2) * 16)
    elif base == "vit":  # NF4 blocks over fsdp; the patch projection (4-D, no linear layer) replicated
        assert isinstance(loaded["vit"]["layers"]["0"]["attention"]["q_proj"]["kernel"], lowrax.NF4Tensor)
        assert loaded["vit"]["embeddings"]["patch_embeddings"]["projection"]["weight"].sharding.spec == P(None, None, None, None)
    elif base == "t5":  # every stack's projections in NF4, the position-bias table split over heads
        wo = loaded["decoder"]["block"]["0"]["layer"]["2"]["DenseReluDense"]["wo"]["kernel"]
        assert isinstance(wo, lowrax.NF4Tensor)
        table = loaded["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"]["embedding"]
        assert table.sharding.spec == P(None, "tensor")
    else:
        assert isinstance(loaded["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"], lowrax.NF4Tensor)


def conformance_examples() -> list[tuple[str, str]]:
    from lowrax.adapters.registry import method_named

    return [(name, example) for name in lowrax.method_names() for example in method_named(name).examples]


@pytest.mark.parametrize("name, example", conformance_examples())
def test_every_registered_method_steps_sharded_as_on_one_device(name, example):
    """The conformance suite's sharded contract: each method example (from the registry) on the tiny
    conformance llama takes the same two steps on the tensor2-fsdp2-data2 mesh as on one device."""
    from lowrax.adapters.registry import method_named
    from tests.conformance_models import tiny

    model, params, _ = tiny("llama")
    rng = np.random.default_rng(0)
    data = [{"input_ids": rng.integers(2, 60, (8, 8)).astype(np.int32), "attention_mask": np.ones((8, 8), np.int32),
             "loss_mask": np.ones((8, 8), np.int32)} for _ in range(2)]

    def run(mesh):
        own = jax.tree.map(jnp.copy, params)  # the step donates its buffers; the cached model's stay whole
        wrapped = lowrax.wrap(own, method_named(name).examples[example](), jax.random.key(1), model=model)
        trainable, frozen = lowrax.split(wrapped)
        optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10))
        step, state, frozen = sharded_train_step(model, optimizer, mesh, init_state(trainable, optimizer), frozen)
        losses = []
        for batch in data:
            state, metrics = step(state, frozen, global_batch(mesh, batch))
            losses.append(float(metrics["loss"]))
        return losses, state

    ref_losses, ref_state = run(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    losses, state = run(make_mesh(MESHES["tensor2-fsdp2-data2"]))
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    for ours, ref in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(ref_state.trainable)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
