"""Conveyor segregation: split a feature set into train and test parts (pure pandas).

Example::

    from segregation import split
    parts = split(features, "sequential", ratio=0.8, label="is_fraud")
    parts.X_train, parts.y_train, parts.X_test, parts.y_test, parts.warnings
"""

from segregation.checks import SplitWarning
from segregation.config import SplitConfig
from segregation.split import Split, split
from segregation.strategies import STRATEGIES, Strategy

__all__ = ["STRATEGIES", "Split", "SplitConfig", "SplitWarning", "Strategy", "split"]
