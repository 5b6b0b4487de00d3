"""Shared fixtures: small random-initialised HF models saved to disk, built from configs.

The suite shares one persistent JAX compilation cache (`.jax-cache/` at the repository root)
between its worker processes and the 8-device child runs: many tests jit the same programs
anew (a fresh `jax.jit` misses the in-memory cache), and the disk cache serves them. XLA's
backend optimisation level is 0 for the same reason (see below); child processes inherit both.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The suite's programs are tiny: compiling them costs far more than running them, and LLVM's
# optimisation passes are most of the compile (about a quarter of the suite's time on 2 cores).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


# A Llama small enough for the trainer-parity tests (TRL's preference and GRPO trainers around it)
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def hf_model_dir(tmp_path_factory, name: str, build):
    """Save the torch model `build()` returns as an HF directory; returns (dir, torch model)."""
    torch = pytest.importorskip("torch", reason="parity tests need the torch reference (pip install -e .[test])")
    torch.manual_seed(0)
    model = build().eval()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return path, model


def random_batch(vocab: int, lengths: list[int], pad_id: int, left: bool, seed: int = 0):
    """(ids, mask) int arrays [b, max(lengths)] padded on the left or right with pad_id."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), pad_id, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        span = slice(t - n, t) if left else slice(0, n)
        ids[row, span] = rng.integers(3, vocab, n)
        mask[row, span] = 1
    return ids, mask


def tiny_llama_dir(tmp_path_factory):
    """A tiny random llama sharing SmolLM2's vocabulary (49152), with that tokenizer saved beside it:
    `lowrax train` runs end to end in seconds."""
    import json

    from safetensors.numpy import save_file

    import lowrax
    from lowrax.models import model_from_hf_config

    path = tmp_path_factory.mktemp("tiny-llama")
    config = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "tie_word_embeddings": True, "eos_token_id": 2}
    model = model_from_hf_config(config)
    rng = np.random.default_rng(0)
    tensors = {t.hf_key: (0.05 * rng.normal(size=t.hf_shape)).astype(np.float32) for t in model.tensors()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    lowrax.load_tokenizer(None).save_pretrained(str(path))
    return path


def tiny_t5_dir(tmp_path_factory):
    """A tiny random Flan-T5-style model (gated GELU, separate head) on SmolLM2's vocabulary, with that
    tokenizer beside it: `lowrax train model.task=seq2seq` runs end to end in seconds."""
    import json

    from safetensors.numpy import save_file

    import lowrax
    from lowrax.models import model_from_hf_config

    path = tmp_path_factory.mktemp("tiny-t5")
    config = {"model_type": "t5", "vocab_size": 49152, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
              "num_heads": 4, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
              "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 2}
    model = model_from_hf_config(config)
    rng = np.random.default_rng(0)
    # norms at 1 as in a trained model (at 0.05 the final norm would hold every logit near 0)
    tensors = {t.hf_key: (np.ones(t.hf_shape) if t.path[-1] == "scale" else 0.05 * rng.normal(size=t.hf_shape))
               .astype(np.float32) for t in model.tensors()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    lowrax.load_tokenizer(None).save_pretrained(str(path))
    return path


def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT on the embedded MiniLM's vocabulary, with its tokenizer files beside it:
    `lowrax train model.task=classification` runs in seconds (the real MiniLM is kept for one run)."""
    import json
    import shutil

    from safetensors.numpy import save_file

    import lowrax
    from lowrax.models import model_from_hf_config

    minilm = lowrax.embedded_minilm_path()
    path = tmp_path_factory.mktemp("tiny-bert")
    config = {**json.loads((minilm / "config.json").read_text()), "hidden_size": 32, "intermediate_size": 48,
              "num_attention_heads": 4, "num_hidden_layers": 2}
    model = model_from_hf_config(config)
    rng = np.random.default_rng(0)
    tensors = {t.hf_key: (np.ones(t.hf_shape) if t.hf_key.endswith("LayerNorm.weight") else
                          0.05 * rng.normal(size=t.hf_shape)).astype(np.float32) for t in model.tensors()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, path / name)
    return path


_FORWARDS: dict[int, tuple] = {}


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop the compiled programs each test file leaves behind. A worker runs dozens of files; kept, their
    XLA:CPU executables grew one worker past 6 GB and towards the kernel's limit on memory mappings
    (vm.max_map_count, 65530), and a compilation late in the suite died with a segmentation fault.
    The disk cache serves any program a later file needs again."""
    yield
    import jax

    jax.clear_caches()
    _FORWARDS.clear()


def forward(model):
    """`model.apply` compiled once per model (and per input shape): op-by-op (eager) calls compile every
    primitive for every new shape, seconds per call on a CPU."""
    import jax

    held = _FORWARDS.get(id(model))
    if held is None or held[0] is not model:
        held = _FORWARDS[id(model)] = (model, jax.jit(model.apply))
    return held[1]


# The longest files first: with `--dist loadfile` each file runs whole on one worker, in collection
# order, so a long file collected last keeps one core busy while the other has nothing left to do.
# (Measured worker seconds per file, 2 cores, 2026-12-06; test_sharding is one test that runs a child
# pytest for about 90 s alone, 160 s beside the two workers.)
LONGEST_FIRST = ("test_sharding.py", "test_training_run.py", "test_objective_runs.py", "test_train_step.py",
                 "test_conformance.py", "test_pruning.py", "test_smollm2.py", "test_decoder_parity.py",
                 "test_prompt_learning.py", "test_t5.py", "test_variants.py", "test_nf4.py", "test_run_lifecycle.py",
                 "test_safe_outputs.py", "test_combine_adapters.py", "test_lycoris.py")


def pytest_configure(config):
    # xdist orders files by their number of tests unless told not to, which would put test_sharding
    # (one long test) last; keep the order below.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
