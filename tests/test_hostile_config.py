"""Hostile configs: every bad key, value, YAML file and override gets one LowraxError that names the
key (or file) and what is expected; nothing else escapes. Config reading loads no model, so these
run in milliseconds; a few go through the CLI to check the exit code and the one-line message."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowrax
from lowrax.cli.main import main as cli_main
from lowrax.pruning.config import load_prune_config
from lowrax.train.config import load_config

# (override, text the error must contain). The text names the key the user wrote.
BAD_OVERRIDES = [
    # numbers that are not numbers, or not in range
    ("train.steps=abc", "train.steps must be an integer"),
    ("train.steps=-3", "train.steps must be an integer >= 0"),
    ("train.steps=2.5", "train.steps must be an integer"),
    ("train.steps=[1,2]", "train.steps must be an integer"),
    ("train.steps=null", "train.steps must be an integer"),
    ("train.steps=true", "train.steps must be an integer"),
    ("train.batch_size=0", "train.batch_size must be an integer >= 1"),
    ("train.batch_size=-1", "train.batch_size must be an integer >= 1"),
    ("train.batch_size=[2,4]", "train.batch_size must be an integer"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps must be an integer >= 1"),
    ("train.save_every=-1", "train.save_every must be an integer >= 0"),
    ("train.max_checkpoints=0", "train.max_checkpoints must be an integer >= 1"),
    ("train.max_checkpoints=-1", "train.max_checkpoints must be an integer >= 1"),
    ("train.eval_every=-5", "train.eval_every must be an integer >= 0"),
    ("train.eval_max_new_tokens=-1", "train.eval_max_new_tokens must be an integer >= 1"),
    ("train.eval_examples=-2", "train.eval_examples must be an integer >= 0"),
    ("train.samples=-1", "train.samples must be an integer >= 0"),
    ("train.seed=abc", "train.seed must be an integer"),
    ("train.seed=-1", "train.seed must be an integer >= 0"),
    ("train.resume=maybe", "train.resume must be true or false"),
    ("train.resume=1", "train.resume must be true or false"),
    ("train.remat=yes please", "train.remat must be true or false"),
    ("train.output_dir=null", "train.output_dir must be a string"),
    ("train.output_dir=5", "train.output_dir must be a string"),
    ("optim.learning_rate=abc", "optim.learning_rate must be a number"),
    ("optim.learning_rate=0", "optim.learning_rate must be a number > 0"),
    ("optim.learning_rate=-1e-4", "optim.learning_rate must be a number > 0"),
    ("optim.learning_rate=1e400", "optim.learning_rate must be a finite number"),
    ("optim.learning_rate=.nan", "optim.learning_rate must be a finite number"),
    ("optim.learning_rate=.inf", "optim.learning_rate must be a finite number"),
    ("optim.max_grad_norm=0", "optim.max_grad_norm must be a number > 0 or null"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm must be a number > 0 or null"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a number >= 0"),
    ("optim.b1=1.5", "optim.b1 must be a number in [0, 1)"),
    ("optim.b1=1", "optim.b1 must be a number in [0, 1)"),
    ("optim.b2=-1", "optim.b2 must be a number in [0, 1)"),
    ("optim.eps=-1", "optim.eps must be a number > 0"),
    ("optim.eps=0", "optim.eps must be a number > 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be an integer >= 0"),
    ("optim.total_steps=0", "optim.total_steps must be an integer >= 1"),
    ("optim.loraplus_lr_ratio=0", "optim.loraplus_lr_ratio must be a number > 0 or null"),
    ("optim.schedule=cosin", "did you mean 'cosine'"),
    ("optim.schedule=5", "optim.schedule must be one of cosine, linear, constant"),
    ("data.seq_len=0", "data.seq_len must be an integer >= 2"),
    ("data.seq_len=-8", "data.seq_len must be an integer >= 2"),
    ("data.seq_len=1", "data.seq_len must be an integer >= 2"),
    ("data.target_len=0", "data.target_len must be an integer >= 1"),
    ("data.eval_fraction=1.5", "data.eval_fraction must be a number in [0, 1)"),
    ("data.eval_fraction=1", "data.eval_fraction must be a number in [0, 1)"),
    ("data.eval_fraction=-0.1", "data.eval_fraction must be a number in [0, 1)"),
    ("data.loss_positions=-1", "data.loss_positions must be an integer >= 0"),
    ("data.format=csv", "data.format must be one of auto, prompt_response"),
    ("data.format=mesages", "did you mean 'messages'"),
    ("data.source=null", "data.source must be a string"),
    ("data.source=7", "data.source must be a string"),
    ("data.packing=sometimes", "data.packing must be true or false"),
    ("data.chat_template=2", "data.chat_template must be true or false"),
    ("data.text_field=[a]", "data.text_field must be a string"),
    ("data.default_train_examples=0", "data.default_train_examples must be an integer >= 1"),
    ("model.path=5", "model.path must be a string or null"),
    ("model.path=[a]", "model.path must be a string or null"),
    ("model.dtype=float8", "did you mean 'float32'"),
    ("model.dtype=fp32", "model.dtype must be one of float32, bfloat16, float16"),
    ("model.num_labels=0", "model.num_labels must be an integer >= 2 or null"),
    ("model.num_labels=1", "model.num_labels must be an integer >= 2 or null"),
    ("model.num_labels=two", "model.num_labels must be an integer >= 2 or null"),
    ("model.quantize=nf5", "model.quantize must be null or one of int8, nf4"),
    ("model.quantize=true", "model.quantize must be a string or null"),
    ("model.quant_blocksize=48", "model.quant_blocksize must be an integer that is a power of two"),
    ("model.quant_blocksize=8192", "model.quant_blocksize must be an integer that is a power of two in [32, 4096]"),
    ("model.double_quant=2", "model.double_quant must be true or false"),
    ("model.task=foo", "model.task must be one of causal_lm, classification, seq2seq"),
    ("model.task=[causal_lm]", "model.task must be a string"),
    # the adapter's section
    ("lora.r=abc", "lora.r must be an integer"),
    ("lora.r=0", "lora.r must be an integer >= 1"),
    ("lora.r=-4", "lora.r must be an integer >= 1"),
    ("lora.alpha=abc", "lora.alpha must be a number"),
    ("lora.alpha=0", "lora.alpha must be a number > 0"),
    ("lora.alpha=-8", "lora.alpha must be a number > 0"),
    ("lora.dropout=1", "lora.dropout must be a number in [0, 1)"),
    ("lora.dropout=-0.1", "lora.dropout must be a number in [0, 1)"),
    ("lora.use_rslora=maybe", "lora.use_rslora must be true or false"),
    ("lora.init=kaiming_uniform", "lora.init must be one of kaiming, gaussian, random, orthogonal, mica, pissa"),
    ("lora.variant=dorra", "did you mean 'dora'"),
    ("lora.target_modules=((", "lora.target_modules must be a valid regular expression"),
    ("lora.target_modules=5", "lora.target_modules must be a string or a list of strings or null"),
    ("lora.target_modules=[q_proj, 5]", "lora.target_modules must be a string or a list of strings or null"),
    ("lora.exclude_modules=[[", "lora.exclude_modules"),
    ("lora.exclude_modules=*bad", "override lora.exclude_modules='*bad': the value is not valid YAML"),
    ("lora.exclude_modules='*bad'", "lora.exclude_modules must be a valid regular expression"),
    ("lora.layers_to_transform=[a]", "lora.layers_to_transform must be"),
    ("lora.layers_to_transform=-1", "lora.layers_to_transform must be"),
    ("lora.modules_to_save=5", "lora.modules_to_save must be a string or a list of strings"),
    ("lora.rank_pattern=5", "lora.rank_pattern must be a mapping"),
    ("lora.rank_pattern=[q]", "lora.rank_pattern must be a mapping"),
    ("lora.rank_pattern={q_proj: 0}", "lora.rank_pattern['q_proj'] must be an integer >= 1, got 0"),
    ("lora.rank_pattern={q_proj: abc}", "lora.rank_pattern['q_proj'] must be an integer >= 1, got 'abc'"),
    ("lora.rank_pattern={'((': 4}", "lora.rank_pattern must be a valid regular expression"),
    ("lora.alpha_pattern={q_proj: -1}", "lora.alpha_pattern['q_proj'] must be a number > 0, got -1"),
    ("lora.delta_start_step=-1", "lora.delta_start_step"),
    ("lora.nope=1", "unknown config key 'lora.nope'"),
    ("lora.rr=8", "did you mean 'lora.r'"),
    ("trian.steps=3", "did you mean 'train.steps'"),
    ("train.step=3", "did you mean 'train.steps'"),
    ("steps=3", "unknown config key 'steps'; did you mean 'train.steps'?"),
    ("train.steps", "must look like section.key=value"),
    ("a.b.c=1", "must be section.key"),
    ("method=[lora]", "config key 'method' must be a method name"),
    ("method=5", "config key 'method' must be a method name"),
    ("method=loar", "lora"),
    ("objective=[dpo]", "objective must be one of"),
    ("objective=ppo", "objective must be one of sft, dpo"),
    ("train.steps=[1,", "override train.steps='[1,': the value is not valid YAML"),
    ("train.steps={a", "the value is not valid YAML"),
    # the other sections
    ("mesh.data=0", "mesh.data must be a positive number of replicas"),
    ("mesh.data=-2", "mesh.data must be an integer >= -1"),
    ("mesh.fsdp=0", "mesh.fsdp must be an integer >= 1"),
    ("mesh.tensor=two", "mesh.tensor must be an integer"),
    ("dist.num_processes=0", "dist.num_processes must be an integer >= 1 or null"),
    ("dist.process_id=-1", "dist.process_id must be an integer >= 0 or null"),
    ("dist.local_device_ids=[a]", "dist.local_device_ids must be a list of integers"),
    ("dist.coordinator_address=5", "dist.coordinator_address must be a string or null"),
]

# (overrides, text) that need another key set first: the section only applies to some methods/objectives.
BAD_COMBINATIONS = [
    (["objective=dpo", "preference.beta=0"], "preference.beta must be a number > 0"),
    (["objective=dpo", "preference.loss_type=sigmod"], "did you mean 'sigmoid'"),
    (["objective=dpo", "preference.label_smoothing=0.5"], "preference.label_smoothing must be a number in [0, 0.5)"),
    (["objective=kto", "preference.desirable_weight=0"], "preference.desirable_weight must be a number > 0"),
    (["objective=dpo", "preference.reference=model"], "preference.reference must be one of adapters_off, precomputed"),
    (["objective=distill", "distill.beta=2"], "distill.beta must be a number in [0, 1]"),
    (["objective=distill", "distill.temperature=0"], "distill.temperature must be a number > 0"),
    (["objective=distill", "distill.on_policy=-1"], "distill.on_policy must be a number in [0, 1]"),
    (["objective=distill", "distill.generation_tokens=0"], "distill.generation_tokens must be an integer >= 1"),
    (["objective=distill", "distill.teacher_sharding=all"], "distill.teacher_sharding must be one of student, data"),
    (["objective=distill", "distill.teacher=null"], "distill.teacher must be a string"),
    (["method=ia3", "ia3.feedforward_modules=(("], "ia3.feedforward_modules must be a valid regular expression"),
    (["method=ia3", "ia3.init_ia3_weights=maybe"], "ia3.init_ia3_weights must be true or false"),
    (["method=oft", "oft.module_dropout=1"], "oft.module_dropout must be a number in [0, 1)"),
    (["method=oft", "oft.eps=0"], "oft.eps must be a number > 0"),
    (["method=oft", "oft.r=-1"], "oft.r must be an integer >= 0"),
    (["method=adalora", "adalora.beta1=1"], "adalora.beta1 must be a number in (0, 1)"),
    (["method=adalora", "adalora.deltaT=0"], "adalora.deltaT must be an integer >= 1"),
    (["method=adalora", "adalora.init_r=0"], "adalora.init_r must be an integer >= 1"),
    (["method=adalora", "adalora.total_step=0"], "adalora.total_step must be an integer >= 1 or null"),
    (["method=loha", "loha.r=0"], "loha.r must be an integer >= 1"),
    (["method=loha", "loha.rank_dropout=1.5"], "loha.rank_dropout must be a number in [0, 1)"),
    (["method=lokr", "lokr.alpha=abc"], "lokr.alpha must be a number"),
    (["method=lokr", "lokr.rank_pattern={a: 0}"], "lokr.rank_pattern['a'] must be an integer >= 1"),
    (["method=bottleneck", "bottleneck.dropout=2"], "bottleneck.dropout must be a number in [0, 1) or null"),
    (["method=bottleneck", "bottleneck.leave_out=[x]"], "bottleneck.leave_out must be a list of integers"),
    (["method=prompt_tuning", "prompt_tuning.num_virtual_tokens=0"],
     "prompt_tuning.num_virtual_tokens must be an integer >= 1"),
    (["method=p_tuning", "p_tuning.encoder_dropout=1"], "p_tuning.encoder_dropout must be a number in [0, 1)"),
    (["method=p_tuning", "p_tuning.encoder_hidden_size=0"], "p_tuning.encoder_hidden_size must be an integer >= 1"),
    (["method=prefix_tuning", "prefix_tuning.encoder_hidden_size=-1"],
     "prefix_tuning.encoder_hidden_size must be an integer >= 1 or null"),
    (["method=ln_tuning", "ln_tuning.target_modules=(("], "ln_tuning.target_modules must be a valid regular expression"),
    (["method=ia3", "lora.r=4"], "configures method 'lora', but method is 'ia3'"),
]

BAD_PRUNE = [
    ("prune.sparsity=1.5", "prune.sparsity must be a number in [0, 1)"),
    ("prune.sparsity=abc", "prune.sparsity must be a number"),
    ("prune.method=wand", "did you mean 'wanda'"),
    ("prune.blocksize=0", "prune.blocksize must be an integer >= 1"),
    ("prune.dampening=0", "prune.dampening must be a number > 0"),
    ("prune.chunk_rows=-1", "prune.chunk_rows must be an integer >= 1"),
    ("prune.ignore=5", "prune.ignore must be a list of strings"),
    ("prune.pattern=2:5:1", "pattern"),
    ("calibration.samples=0", "calibration.samples must be an integer >= 1"),
    ("calibration.length=1", "calibration.length must be an integer >= 2"),
    ("evaluation.samples=-1", "evaluation.samples must be an integer >= 0"),
    ("model.dtype=float16", "model.dtype must be one of float32, bfloat16"),
    ("prune.output_dir=5", "prune.output_dir must be a string"),
    ("prune.output_dir=null", "prune.output_dir must be a string"),
    ("output_dir=runs/x", "unknown prune config key 'output_dir'; did you mean 'prune.output_dir'"),
    ("prune.nope=1", "unknown prune config key 'prune.nope'"),
]


def _error(call) -> str:
    with pytest.raises(lowrax.LowraxError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("override, expected", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_is_one_named_error(override, expected):
    message = _error(lambda: load_config(None, [override]))
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("overrides, expected", BAD_COMBINATIONS, ids=[" ".join(o) for o, _ in BAD_COMBINATIONS])
def test_bad_section_value_is_one_named_error(overrides, expected):
    message = _error(lambda: load_config(None, overrides))
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("override, expected", BAD_PRUNE, ids=[o for o, _ in BAD_PRUNE])
def test_bad_prune_override_is_one_named_error(override, expected):
    message = _error(lambda: load_prune_config(None, [override]))
    assert expected in message and "\n" not in message


BAD_FILES = [
    (b"train:\n  steps: 3\n  steps: 4\n", r"cfg\.yaml:3:3: duplicate key 'steps' \(first given on line 2\)"),
    (b"train:\n  steps: 3\ntrain:\n  batch_size: 2\n", r"cfg\.yaml:3:1: duplicate key 'train'"),
    (b"train:\n  steps: [1,\n", r"cfg\.yaml:3:1: .*not valid YAML"),
    (b"train:\n\tsteps: 3\n", r"cfg\.yaml:2:1: .*not valid YAML"),
    (b"train: {steps: 3\n", r"cfg\.yaml:2:1: .*not valid YAML"),
    (b"\xff\xfe\x00t", r"cfg\.yaml is not UTF-8 text"),
    (b"train: 5\n", r"config section 'train' must be a mapping, got int"),
    (b"- train\n- data\n", r"cfg\.yaml must hold a mapping of sections"),
    (b"just a sentence\n", r"cfg\.yaml must hold a mapping of sections"),
    (b"train:\n  steps: -1\n", r"train\.steps must be an integer >= 0, got -1"),
    (b"trian:\n  steps: 3\n", r"did you mean 'train'"),
    (b"lora:\n  r: 8\n  alpha: sixteen\n", r"lora\.alpha must be a number > 0, got 'sixteen'"),
    (b"method: ia3\nlora:\n  r: 8\n", r"configures method 'lora', but method is 'ia3'"),
]


@pytest.mark.parametrize("content, expected", BAD_FILES, ids=[str(i) for i in range(len(BAD_FILES))])
def test_bad_config_file_is_one_error_naming_the_file_or_key(tmp_path, content, expected):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    message = _error(lambda: load_config(path))
    assert re.search(expected, message), message
    message = _error(lambda: load_prune_config(path)) if b"train" not in content else None
    assert message is None or "cfg.yaml" in message or "unknown prune config key" in message


def test_a_directory_or_missing_file_as_config(tmp_path):
    assert "is a directory; expected a YAML file" in _error(lambda: load_config(tmp_path))
    assert "does not exist" in _error(lambda: load_config(tmp_path / "nope.yaml"))
    assert "is a directory" in _error(lambda: load_prune_config(tmp_path))


def test_good_values_are_converted_to_their_declared_form():
    cfg = load_config(None, ["train.steps=1e3", "lora.target_modules=[q_proj, v_proj]", "lora.alpha=16",
                             "lora.layers_to_transform=1", "optim.max_grad_norm=null"])
    assert cfg.train.steps == 1000 and type(cfg.train.steps) is int
    assert cfg.adapter.target_modules == ("q_proj", "v_proj") and cfg.adapter.alpha == 16.0
    assert cfg.adapter.layers_to_transform == (1,) and cfg.optim.max_grad_norm is None


def test_library_configs_check_their_fields_too():
    with pytest.raises(lowrax.LowraxError, match=r"LoraConfig\.r must be an integer >= 1, got 0"):
        lowrax.LoraConfig(r=0)
    with pytest.raises(lowrax.LowraxError, match=r"LoraConfig\.dropout must be a number in \[0, 1\), got 1\.0"):
        lowrax.LoraConfig(dropout=1.0)
    import numpy as np

    assert lowrax.LoraConfig(r=np.int64(4), alpha=np.float32(8)).r == 4  # numpy scalars are numbers too


# Property-based: any value of the wrong kind for a typed key is refused by name, never a traceback.
_WRONG_FOR_INT = st.one_of(st.text(min_size=1).filter(lambda s: not s.strip().lstrip("+-").isdigit()),
                           st.floats(allow_nan=True).filter(lambda x: not float(x).is_integer()),
                           st.lists(st.integers(), max_size=3), st.booleans(), st.none())
_INT_KEYS = ["train.steps", "train.batch_size", "train.grad_accum_steps", "data.seq_len", "lora.r", "train.seed"]


_WRONG_FOR_REAL = st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: x != x or abs(x) == float("inf")),
                            st.floats(max_value=-1e-12), st.text(), st.lists(st.floats(), max_size=2), st.booleans())
_REAL_KEYS = ["optim.learning_rate", "optim.eps", "lora.alpha", "optim.weight_decay"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.one_of(st.tuples(st.sampled_from(_INT_KEYS), _WRONG_FOR_INT),
                      st.tuples(st.sampled_from(_REAL_KEYS), _WRONG_FOR_REAL)))
def test_any_wrong_value_for_a_numeric_key_is_refused_by_name(case):
    """Non-integers for integer keys; non-finite, negative or non-numbers for number keys."""
    key, value = case
    section, name = key.split(".")
    with pytest.raises(lowrax.LowraxError, match=re.escape(key)):
        lowrax.train.config.from_dict({section: {name: value}})


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_any_override_text_gives_a_config_or_a_lowrax_error(text):
    """Arbitrary override strings: a valid config or one LowraxError, never another exception."""
    try:
        load_config(None, [text])
    except lowrax.LowraxError as e:
        assert str(e) and "Traceback" not in str(e)


@pytest.mark.parametrize("argv, expected", [
    (["train", "train.steps=abc"], "train.steps must be an integer >= 0, got 'abc'"),
    (["train", "optim.learning_rate=.nan"], "optim.learning_rate must be a finite number"),
    (["train", "lora.target_modules=(("], "lora.target_modules must be a valid regular expression"),
    (["prune", "prune.sparsity=2"], "prune.sparsity must be a number in [0, 1)"),
])
def test_cli_exits_2_with_one_line_naming_the_key(capsys, argv, expected):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowrax: error: ") and expected in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
