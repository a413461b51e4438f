"""The whole experiment config: sections, cross-section checks, and parsing a ConfigDict.

    cfg = parse_config(config_dict)   # ExperimentConfig, or ConfigError naming the key's path

The model section becomes lcjax.models.config.ModelConfig (its fields are whatever that frozen
dataclass declares); the others are the dataclasses of lcjax.config.sections.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lcjax.config.convert import ConfigError, plain, to_dataclass
from lcjax.config.sections import DataConfig, EvalConfig, MeshConfig, OptimizerConfig, TrainConfig

# lcjax.data.tokenizer.VOCAB_SIZE (kept here so that parsing a config does not import TFDS).
BYTE_VOCAB_SIZE = 259
SECTIONS = ("model", "data", "optimizer", "train", "eval", "mesh")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: Any  # lcjax.models.config.ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  eval: EvalConfig
  mesh: MeshConfig


def default_model_config_cls() -> type:
  from lcjax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  return ModelConfig


def first_attr(obj: Any, names: tuple[str, ...]) -> tuple[str | None, Any]:
  """The first of `names` that `obj` has, and its value (model configs name fields differently)."""
  for name in names:
    if hasattr(obj, name):
      return name, getattr(obj, name)
  return None, None


def check_model(model: Any) -> None:
  """Head/width divisibility, in case ModelConfig does not check it itself."""
  dim_name, dim = first_attr(model, ("dim", "d_model", "hidden_size", "embed_dim"))
  heads_name, heads = first_attr(model, ("n_heads", "num_heads", "num_attention_heads"))
  kv_name, kv_heads = first_attr(model, ("n_kv_heads", "num_kv_heads", "num_key_value_heads"))
  hd_name, head_dim = first_attr(model, ("head_dim",))
  if heads is not None and heads < 1:
    raise ConfigError(f"config.model.{heads_name}={heads}: must be >= 1")
  if dim is not None and heads and head_dim is None and dim % heads:
    raise ConfigError(f"config.model.{heads_name}={heads} must divide config.model.{dim_name}={dim}; "
                      f"accepted: a divisor of {dim}, e.g. {[h for h in range(1, dim + 1) if dim % h == 0][-4:]}")
  if heads and kv_heads and (kv_heads < 1 or heads % kv_heads):
    raise ConfigError(f"config.model.{kv_name}={kv_heads} must divide config.model.{heads_name}={heads} "
                      f"(GQA/MQA); accepted: one of {[h for h in range(1, heads + 1) if heads % h == 0]}")


def check_across_sections(cfg: ExperimentConfig) -> None:
  """Constraints that involve more than one section."""
  max_name, max_len = first_attr(cfg.model, ("max_seq_len", "max_position_embeddings", "max_len"))
  if max_len is not None:
    if cfg.data.seq_len > max_len:
      raise ConfigError(f"config.data.seq_len={cfg.data.seq_len} exceeds config.model.{max_name}={max_len}; "
                        f"accepted: seq_len <= {max_len}")
    too_long = [n for n in cfg.eval.lengths if n > max_len]
    if too_long and {"passkey", "mqar"} & set(cfg.eval.tasks):
      raise ConfigError(f"config.eval.lengths={cfg.eval.lengths}: {too_long} exceed "
                        f"config.model.{max_name}={max_len}; accepted: lengths <= {max_len}")
  lengths = cfg.data.options.get("lengths")
  if cfg.data.task in ("passkey", "mqar") and isinstance(lengths, (tuple, list)) and lengths \
      and max(lengths) > cfg.data.seq_len:
    raise ConfigError(f"config.data.options.lengths={tuple(lengths)}: task examples are never cut, so every "
                      f"length must fit config.data.seq_len={cfg.data.seq_len}; accepted: lengths <= "
                      f"{cfg.data.seq_len} (or a larger seq_len)")
  shards = cfg.mesh.batch_shards
  accum = cfg.optimizer.grad_accum_steps
  if cfg.data.batch_size % accum:
    raise ConfigError(f"config.data.batch_size={cfg.data.batch_size} is not divisible by "
                      f"config.optimizer.grad_accum_steps={accum}; accepted: a multiple of {accum}")
  micro = cfg.data.batch_size // accum
  if micro % shards:
    raise ConfigError(
        f"config.data.batch_size={cfg.data.batch_size} gives micro-batches of {micro} rows "
        f"(grad_accum_steps={accum}), not divisible by the batch-parallel mesh size "
        f"config.mesh.data x config.mesh.fsdp = {cfg.mesh.data} x {cfg.mesh.fsdp} = {shards}; "
        f"accepted: batch_size a multiple of {accum * shards}")
  if cfg.eval.batch_size % shards:
    raise ConfigError(f"config.eval.batch_size={cfg.eval.batch_size} is not divisible by "
                      f"config.mesh.data x config.mesh.fsdp = {shards}; accepted: a multiple of {shards}")
  _, vocab = first_attr(cfg.model, ("vocab_size",))
  if vocab is not None and vocab < BYTE_VOCAB_SIZE:
    raise ConfigError(f"config.model.vocab_size={vocab} is too small for lcjax's byte-level tokenizer "
                      f"({BYTE_VOCAB_SIZE} ids: 256 bytes, BOS, EOS, PAD); accepted: vocab_size >= "
                      f"{BYTE_VOCAB_SIZE} (384 recommended, a multiple of 128)")


def parse_config(config: Any, model_config_cls: type | None = None) -> ExperimentConfig:
  """ConfigDict (or dict) with sections model/data/optimizer/train/eval/mesh -> ExperimentConfig.

  Raises ConfigError (a ValueError) naming the key's full path and what would be accepted.
  """
  raw = plain(config)
  if not isinstance(raw, dict):
    raise ConfigError(f"config: expected a ConfigDict with sections {SECTIONS}, got {type(raw).__name__}")
  unknown = sorted(set(raw) - set(SECTIONS))
  if unknown:
    raise ConfigError(f"config: unknown section(s) {', '.join('config.' + k for k in unknown)}; "
                      f"accepted sections: {', '.join(SECTIONS)}")
  if "model" not in raw:
    raise ConfigError("config.model: required section is missing")
  model_cls = model_config_cls or default_model_config_cls()
  model = to_dataclass(model_cls, raw["model"], "config.model")
  check_model(model)
  cfg = ExperimentConfig(
      model=model,
      data=to_dataclass(DataConfig, raw.get("data", {}), "config.data"),
      optimizer=to_dataclass(OptimizerConfig, raw.get("optimizer", {}), "config.optimizer"),
      train=to_dataclass(TrainConfig, raw.get("train", {}), "config.train"),
      eval=to_dataclass(EvalConfig, raw.get("eval", {}), "config.eval"),
      mesh=to_dataclass(MeshConfig, raw.get("mesh", {}), "config.mesh"))
  check_across_sections(cfg)
  return cfg


def to_dict(cfg: ExperimentConfig) -> dict:
  """ExperimentConfig -> plain dict (for logging the resolved config into the work dir)."""
  return dataclasses.asdict(cfg)
