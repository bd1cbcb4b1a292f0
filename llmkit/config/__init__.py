"""The run config, one package: `schema` (every key's type, default, allowed values, meaning and readers),
`typed` (plain YAML data into the frozen dataclasses, each value checked against its type), `checks` (the value
rules, section by section), `load` (a YAML file plus overrides) and `docs` (`llmkit config`: the keys listed, a
starter YAML written)."""

from llmkit.config.load import load_config
from llmkit.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    LoraConfig,
    MixtureSource,
    ModelConfig,
    OutputConfig,
    TrainConfig,
)

__all__ = ["CheckpointConfig", "Config", "DataConfig", "DeepSpeedConfig", "LoraConfig", "MixtureSource",
           "ModelConfig", "OutputConfig", "TrainConfig", "load_config"]
