"""Config parsing: typed sections, and start-up errors that name the key's full path."""
import glob
import os
import subprocess
import sys

import ml_collections
import pytest

from lcjax.config import ConfigError, ExperimentConfig, load_config_file, override_errors, parse_config
from lcjax.config.sections import DataConfig, MeshConfig, OptimizerConfig
from lcjax.models import ModelConfig
from lcjax.models.rope import YarnScaling
from lcjax.train import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base():
  """A valid config as a plain nested dict (parse_config takes dicts and ConfigDicts)."""
  return (dict(
      model=dict(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                 max_seq_len=256),
      data=dict(task="passkey", seq_len=128, batch_size=8),
      optimizer=dict(learning_rate=1e-3, warmup_steps=10, grad_accum_steps=2),
      train=dict(num_steps=100, work_dir="/tmp/x"),
      eval=dict(tasks=("passkey",), lengths=(64, 128)),
      mesh=dict(data=2, fsdp=1, tensor=2)))


def error_for(**overrides) -> str:
  cd = base()
  for dotted, value in overrides.items():
    node = cd
    *parents, leaf = dotted.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ConfigError) as e:
    parse_config(cd)
  return str(e.value)


def test_parses_into_typed_frozen_sections():
  cfg = parse_config(ml_collections.ConfigDict(base()))
  assert isinstance(cfg, ExperimentConfig)
  assert isinstance(cfg.model, ModelConfig) and cfg.model.head_dim == 16
  assert isinstance(cfg.data, DataConfig) and isinstance(cfg.mesh, MeshConfig)
  assert isinstance(cfg.optimizer, OptimizerConfig) and cfg.optimizer.grad_accum_steps == 2
  assert cfg.eval.lengths == (64, 128) and cfg.mesh.size == 4
  with pytest.raises(Exception):
    cfg.model.dim = 3  # frozen


def test_int_accepted_for_float_and_union_of_dataclasses_by_type():
  cd = base()
  cd["optimizer"]["learning_rate"] = 1
  cd["model"]["rope_scaling"] = dict(type="yarn", factor=4)
  cfg = parse_config(cd)
  assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
  assert cfg.model.rope_scaling == YarnScaling(factor=4.0)


@pytest.mark.parametrize("overrides,expected", [
    (dict(model__n_layer=3), ["config.model.n_layer", "accepted keys", "n_layers"]),
    (dict(optimizer__lr=1e-3), ["config.optimizer.lr", "learning_rate"]),
    (dict(model__n_heads="4"), ["config.model.n_heads", "expected int", "'4'"]),
    (dict(train__async_checkpointing=1), ["config.train.async_checkpointing", "expected bool"]),
    (dict(model__n_heads=6, model__n_kv_heads=6), ["config.model.dim=64", "n_heads=6"]),
    (dict(model__n_kv_heads=3), ["config.model.n_heads=4", "n_kv_heads=3"]),
    (dict(data__seq_len=512), ["config.data.seq_len=512", "config.model.max_seq_len=256", "<= 256"]),
    (dict(eval__lengths=(64, 1024)), ["config.eval.lengths", "[1024]", "<= 256"]),
    (dict(data__batch_size=7), ["config.data.batch_size=7", "grad_accum_steps=2", "multiple of 2"]),
    (dict(data__batch_size=6), ["config.data.batch_size=6", "config.mesh.data x config.mesh.fsdp", "multiple of 4"]),
    (dict(mesh__data=4, data__batch_size=12), ["config.data.batch_size=12", "config.mesh.data", "multiple of 8"]),
    (dict(eval__method="beam"), ["config.eval.method", "'beam'", "'teacher_forced'", "'greedy'"]),
    (dict(eval__tasks=("passkey", "ruler")), ["config.eval.tasks", "ruler", "'mqar'"]),
    (dict(eval__depths=(0.5, 1.5)), ["config.eval.depths", "[0, 1]"]),
    (dict(optimizer__clip_norm=-1.0), ["config.optimizer.clip_norm=-1.0", "> 0"]),
    (dict(mesh__tensor=0), ["config.mesh.tensor=0", ">= 1"]),
    (dict(model__vocab_size=100), ["config.model.vocab_size=100", ">= 259"]),
    (dict(model__rope_scaling=dict(factor=2.0)), ["config.model.rope_scaling.type", "linear", "yarn"]),
    (dict(model__attention=("dense", "nope")), ["config.model.attention", "'nope'"]),
    (dict(data__options=dict(lengths=(128, 512))), ["config.data.options.lengths=(128, 512)", "seq_len=128"]),
    (dict(eval__task_options={"passkey": {"digitz": 3}}), ["config.eval.task_options.passkey", "digitz", "'digits'"]),
    (dict(eval__task_options={"ruler": {}}), ["config.eval.task_options", "'ruler'", "'mqar'"]),
    (dict(model__cache=dict(policy="nope")), ["config.model.cache.policy='nope'", "'minicache'"]),
    (dict(model__cache=dict(budgt=64)), ["config.model.cache.budgt", "accepted keys", "budget"]),
    (dict(model__cache=dict(budget="64")), ["config.model.cache.budget", "expected int"]),
    (dict(model__cache=dict(layer_budgets=(8, 16, 32))), ["config.model.cache.layer_budgets", "one per layer (2)"]),
    (dict(model__cache=dict(policy="minicache", minicache_start=1)), ["config.model.cache.minicache_start=1",
                                                                      "[0, 0]"]),
    (dict(model__cla_share=0), ["config.model.cla_share=0", ">= 1"]),
    (dict(model__cla_share=2, model__cache=dict(policy="minicache")), ["config.model.cache.policy='minicache'",
                                                                       "cla_share=1"]),
])
def test_bad_values_fail_with_the_key_path(overrides, expected):
  message = error_for(**overrides)
  for fragment in expected:
    assert fragment in message, (fragment, message)


def test_model_cache_section_parses_into_a_cache_config():
  from lcjax.cache import CacheConfig
  assert parse_config(base()).model.cache == CacheConfig()                  # dense by default
  cd = base()
  cd["model"].update(cla_share=2, cache=dict(policy="h2o", budget=64, window=8, layer_budgets=[32, 64]))
  model = parse_config(ml_collections.ConfigDict(cd)).model
  assert model.cla_share == 2 and model.kv_owners == (0, 0)
  assert model.cache == CacheConfig(policy="h2o", budget=64, window=8, layer_budgets=(32, 64))
  hash(model)                                                               # still a static jit argument


def test_unknown_section_and_missing_model():
  cd = base()
  cd["trainer"] = dict(num_steps=3)
  with pytest.raises(ConfigError, match=r"config\.trainer.*accepted sections"):
    parse_config(cd)
  with pytest.raises(ConfigError, match=r"config\.model: required"):
    parse_config({"data": {}})
  cd = base()
  del cd["model"]["dim"]
  with pytest.raises(ConfigError, match=r"config\.model\.dim: required"):
    parse_config(cd)


def experiment_config_files():
  """configs/*.py files for train/evaluate/quickstart (others, e.g. benchmarks, have their own keys)."""
  return [p for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
          if {"model", "train"} <= set(load_config_file(p).keys())]


def test_experiment_configs_exist():
  names = {os.path.basename(p) for p in experiment_config_files()}
  assert {"quickstart.py", "python_stdlib_lm.py", "mqar.py"} <= names


@pytest.mark.parametrize("path", experiment_config_files())
def test_every_experiment_config_file_parses(path):
  cfg = parse_config(load_config_file(path))
  assert cfg.train.num_steps >= 1


def test_quickstart_config_lists_every_key():
  """ml_collections only overrides keys that exist: the quickstart file lists every field."""
  import dataclasses
  from lcjax.config.sections import EvalConfig, TrainConfig
  cd = load_config_file(os.path.join(ROOT, "configs", "quickstart.py"))
  for name, cls in (("data", DataConfig), ("optimizer", OptimizerConfig), ("train", TrainConfig),
                    ("eval", EvalConfig), ("mesh", MeshConfig)):
    assert set(cd[name].keys()) == {f.name for f in dataclasses.fields(cls)}, name


def test_unknown_override_keys_are_named_with_the_accepted_keys():
  cd = load_config_file(os.path.join(ROOT, "configs", "quickstart.py"))
  argv = ["--config", "configs/quickstart.py", "--config.model.n_layer=3", "--config.modle.dim=3",
          "--config.model.dim.x=1", "--config.data.options.digits=3", "--config.train.num_steps", "5"]
  errors = override_errors(argv, cd)
  assert len(errors) == 3, errors
  assert "unknown key config.model.n_layer (did you mean config.model.n_layers?)" in errors[0]
  assert "accepted keys of config.model: cache, cla_share, dim, " in errors[0]
  assert "unknown key config.modle" in errors[1] and "mesh, model, optimizer" in errors[1]
  assert "config.model.dim is a value (int)" in errors[2]


def test_checks_before_training_name_the_path(tmp_path):
  """What parse_config cannot see: warm-up vs the decay length, and the dataset builder's options."""
  def check(**overrides):
    cd = base()
    for section, values in overrides.items():
      cd[section] = {**cd[section], **values}
    cfg = parse_config(cd)
    with pytest.raises(ConfigError) as e:
      check_config(cfg)
    return str(e.value)

  assert "config.optimizer.warmup_steps=100 must be < the decay length 100" in check(optimizer=dict(warmup_steps=100))
  message = check(data=dict(options=dict(digitz=3)))
  assert "config.data.options (task='passkey')" in message and "['digitz']" in message and "'digits'" in message
  assert "digits=0 is invalid; accepted: an int in [1, 18]" in check(data=dict(options=dict(digits=0)))
  message = check(data=dict(task="passkee", options=dict(digits=3)))
  assert "config.data.task='passkee'" in message and "'passkey'" in message
  check_config(parse_config(base()))   # the valid config passes


def test_command_line_override_errors_name_the_path():
  """The experiments' flags: a bad override fails at start-up, before any training."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for override, expected in (("--config.model.n_heads=3", "config.model.n_heads=3"),
                             ("--config.model.n_layer=3", "unknown key config.model.n_layer")):
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config", "configs/quickstart.py",
                           override], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
