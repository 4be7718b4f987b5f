"""The split settings of the pipeline YAML, validated, and applied in one call.

``extra="forbid"`` makes a misspelt key fail at load, naming the key; an unknown strategy or
a custom path that cannot be imported fails at load too. Example::

    config = SplitConfig.model_validate(yaml.safe_load(text)["split"])
    parts = config.apply(features, label="is_fraud")
"""

from __future__ import annotations

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.errors import InvalidInput
from segregation.split import Split, split
from segregation.strategies import resolve


class SplitConfig(BaseModel):
    """How to split a feature set into train and test parts."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    strategy: str = "random"
    """``sequential``, ``random`` or a custom ``package.module:function`` path."""
    ratio: float = Field(default=0.8, gt=0, lt=1)
    """Share of the rows that goes to train."""
    seed: int = Field(default=0, ge=0)
    """Seed of the random split and of the shuffling."""
    shuffle: bool = False
    """Shuffle the rows within each part after splitting."""
    min_part_rows: int = Field(default=30, ge=0)
    """Warn when a part has fewer rows than this."""
    imbalance_factor: float = Field(default=2.0, ge=1)
    """Warn when a class's share in one part exceeds this many times its share in the other."""

    @field_validator("strategy")
    @classmethod
    def _resolvable(cls, strategy: str) -> str:
        try:
            resolve(strategy)
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None
        return strategy

    def apply(self, frame: pd.DataFrame, label: str | None = None) -> Split:
        """Split ``frame`` with these settings; with a ``label``, into features and labels too."""
        return split(
            frame, self.strategy, self.ratio, self.seed, shuffle=self.shuffle,
            with_labels=label is not None, label=label,
            min_part_rows=self.min_part_rows, imbalance_factor=self.imbalance_factor,
        )
