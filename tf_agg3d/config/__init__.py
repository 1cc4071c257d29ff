"""Typed experiment configuration: dataclasses with defaults, YAML files, strict overrides.

A config is a tree of dataclasses rooted at :class:`ExperimentConfig`. YAML files in
`configs/` set any subset of its fields, and a file may name a ``base:`` file it holds only the
difference from; ``key.sub=value`` overrides from the command line come last. Unknown keys and
values of the wrong type raise :class:`ConfigError` naming the dotted key, before any work
starts. Library code takes these objects; only the entry points know about flags.

The sections are in :mod:`~tf_agg3d.config.schema`, the strict conversion from plain data in
:mod:`~tf_agg3d.config.plain_data`, the checks across sections in :mod:`~tf_agg3d.config.checks`
and the files (``base:`` chains, overrides, saving) in :mod:`~tf_agg3d.config.yaml_files`; the
names below are the package's interface.
"""

from tf_agg3d.config.errors import ConfigError
from tf_agg3d.config.plain_data import from_dict, to_dict
from tf_agg3d.config.schema import (
    AnchorConfig,
    BackboneConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    FPRConfig,
    InferenceConfig,
    LossConfig,
    ModelConfig,
    PreprocessConfig,
    ProposalConfig,
    TrainConfig,
)
from tf_agg3d.config.yaml_files import load_config, save_config

__all__ = [
    "AnchorConfig",
    "BackboneConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FPRConfig",
    "InferenceConfig",
    "LossConfig",
    "ModelConfig",
    "PreprocessConfig",
    "ProposalConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]
