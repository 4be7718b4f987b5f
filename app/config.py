"""The pipeline configuration: one YAML file describing one model's whole pipeline.

Sections: ``datasets`` (contracts), ``features`` (the feature spec), ``split``,
``training`` (candidates) and ``evaluation`` (metric and gate). Every section refuses
unknown keys, so a typo fails at start with the key named. On Kubernetes the file is
mounted from a ConfigMap; locally it is ``config/pipeline.yaml``.

Each stage owns its section's model (``ingestion.contract``, ``preparation.spec``,
``segregation.config``, ``training.config``, ``evaluation.gate``); this module assembles
them into the application's config, so it lives above the stages' libraries and
``common/`` stays free of them. ``app.services`` loads it and passes it to each stage's
``build``, which types only what it reads of it (``preparation.spec.PreparationSections``,
``training.service.TrainingSections``...), so no stage imports this module.

Example::

    config = load_pipeline_config("config/pipeline.yaml")
    config.datasets["paysim"].entity_key      # 'nameOrig'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import InvalidInput
from evaluation.gate import EvaluationConfig
from ingestion.contract import DatasetContract
from preparation.spec import FeatureSpec, describe_errors
from segregation.config import SplitConfig
from training.config import TrainingConfig


class PipelineConfig(BaseModel):
    """Everything the stages need to turn source data into a served model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """The model's name in the registry."""
    datasets: dict[str, DatasetContract] = Field(min_length=1)
    """Contracts of the datasets the pipeline reads, by dataset name."""
    features: FeatureSpec
    """How features are made from the datasets."""
    split: SplitConfig = SplitConfig()
    """How feature sets are split into train and evaluation parts."""
    training: TrainingConfig
    """Candidate models and how to train them."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """How candidates are scored and gated."""

    @model_validator(mode="after")
    def _inputs_are_datasets(self) -> PipelineConfig:
        unknown = [name for name in self.features.inputs if name not in self.datasets]
        if unknown:
            raise ValueError(f"features.inputs name unknown dataset(s) {unknown}")
        return self

    def reads(self, dataset: str) -> bool:
        """Whether the pipeline's features read the dataset."""
        return dataset in self.features.inputs


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML; ``InvalidInput`` names the file and bad keys."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidInput(f"pipeline config {path} not found") from None
    except yaml.YAMLError as exc:
        raise InvalidInput(f"pipeline config {path} is not valid YAML: {exc}") from None
    return parse_pipeline_config(data, str(path))


def parse_pipeline_config(data: Any, source: str = "pipeline config") -> PipelineConfig:
    """Validate an already-loaded pipeline config mapping."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: expected a mapping at the top level")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise InvalidInput(f"{source}: {describe_errors(err)}") from None
