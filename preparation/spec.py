"""The feature spec: what a feature set reads, which columns are special, and its steps.

A spec is plain data (the ``features:`` section of the pipeline YAML). Models refuse
unknown keys, so a typo fails and names the key; ``parse_spec`` turns pydantic's errors
into one ``InvalidInput`` whose message names every bad key. Step kinds and their params
are checked against the registry later, when the pipeline is built.

``FeatureSections`` and ``PreparationSections`` say what the stages that make or serve
features read of the assembled pipeline config; the application layer passes it to their
``build`` (its ``PipelineConfig`` has them all), so no stage imports it.

Example::

    spec = parse_spec({
        "name": "fraud", "inputs": ["transactions"], "entity_key": "nameOrig",
        "timestamp": "timestamp", "label": "isFraud",
        "steps": [{"kind": "one_hot", "params": {"columns": ["type"]}}],
    })
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import InvalidInput

if TYPE_CHECKING:
    from ingestion.contract import DatasetContract
    from segregation.config import SplitConfig

Name = Annotated[str, Field(min_length=1)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JoinSpec(_Spec):
    """How several input datasets are combined: a pandas merge on ``on`` keys."""

    on: Annotated[list[Name], Field(min_length=1)]
    how: Literal["inner", "left", "outer"] = "inner"

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # PyYAML (YAML 1.1) reads a bare ``on:`` key as the boolean True.
        if isinstance(data, Mapping) and True in data:
            return {("on" if key is True else key): value for key, value in data.items()}
        return data


class StepSpec(_Spec):
    """One step: a registered ``kind`` and the params of its factory."""

    kind: Name
    params: dict[str, Any] = Field(default_factory=dict)


class FeatureSpec(_Spec):
    """A feature set: inputs, the entity key, timestamp and label columns, and the steps."""

    name: Name
    inputs: Annotated[list[Name], Field(min_length=1)]
    join: JoinSpec | None = None
    entity_key: Name | None = None
    timestamp: Name | None = None
    label: Name | None = None
    steps: list[StepSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _coherent(self) -> FeatureSpec:
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"inputs repeat a dataset: {self.inputs}")
        if len(self.inputs) > 1 and self.join is None:
            raise ValueError(f"{len(self.inputs)} inputs need a join (join.on keys)")
        special = [c for c in (self.entity_key, self.timestamp, self.label) if c]
        if len(set(special)) != len(special):
            raise ValueError("entity_key, timestamp and label must be different columns")
        return self


@runtime_checkable
class FeatureSections(Protocol):
    """What a stage serving a pipeline's features reads of the pipeline config."""

    @property
    def name(self) -> str:
        """The model's name in the registry."""

    @property
    def datasets(self) -> Mapping[str, DatasetContract]:
        """Contracts of the datasets the features read, by dataset name."""

    @property
    def features(self) -> FeatureSpec:
        """How features are made from the datasets."""


@runtime_checkable
class PreparationSections(FeatureSections, Protocol):
    """What preparation reads of the pipeline config: the features and the split."""

    @property
    def split(self) -> SplitConfig:
        """How feature sets are split into train and evaluation parts."""


def parse_spec(data: Mapping[str, Any] | FeatureSpec) -> FeatureSpec:
    """Validate a features mapping; ``InvalidInput`` names every bad key."""
    if isinstance(data, FeatureSpec):
        return data
    try:
        return FeatureSpec.model_validate(data)
    except ValidationError as err:
        raise InvalidInput(f"invalid feature spec: {describe_errors(err)}") from None


def describe_errors(err: ValidationError) -> str:
    """``"'steps[0].kidn': Extra inputs are not permitted"`` per error, joined by '; '."""
    return "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in err.errors())


def _where(loc: tuple[int | str, ...]) -> str:
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return f"'{text.lstrip('.')}'" if text else "(top level)"
