"""Experiment configs: ml_collections ConfigDicts in configs/*.py -> typed frozen dataclasses."""
from lcjax.config.convert import ConfigError, to_dataclass
from lcjax.config.files import load_config_file
from lcjax.config.experiment import ExperimentConfig, parse_config, to_dict
from lcjax.config.overrides import override_errors
from lcjax.config.sections import DataConfig, EvalConfig, MeshConfig, OptimizerConfig, TrainConfig
