"""Inputs of a feature set: which datasets are still missing, and joining those present.

Example::

    missing_inputs(spec, {"transactions"})            # [] once every input has arrived
    frame = join_inputs({"transactions": tx, "accounts": accounts}, spec)
    frame = joined_frame(raw_store, config.datasets, spec, {"transactions": batch_id})
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from common.errors import InvalidInput
from common.stores import RawBatchStore
from ingestion.contract import DatasetContract, read_batch
from preparation.spec import FeatureSpec, JoinSpec


def missing_inputs(spec: FeatureSpec, available: Iterable[str]) -> list[str]:
    """The spec's input datasets not in ``available``, in the spec's order."""
    have = set(available)
    return [name for name in spec.inputs if name not in have]


def join_inputs(frames: Mapping[str, pd.DataFrame], spec: FeatureSpec) -> pd.DataFrame:
    """One frame from the spec's inputs: the only one, or all merged on ``spec.join``.

    Merges run left to right in ``spec.inputs`` order; a non-key column present on both
    sides keeps its name on the left and takes the suffix ``_{dataset}`` on the right.
    """
    missing = missing_inputs(spec, frames)
    if missing:
        raise InvalidInput(f"feature spec {spec.name}: inputs not available: {missing}")
    first, *rest = spec.inputs
    joined = frames[first]
    for name in rest:
        assert spec.join is not None  # FeatureSpec requires a join for several inputs
        joined = _merge(joined, frames[name], name, spec.join)
    return joined


def joined_frame(
    raw_store: RawBatchStore, datasets: Mapping[str, DatasetContract], spec: FeatureSpec,
    batches: Mapping[str, str],
) -> pd.DataFrame:
    """The input rows of a feature set: each batch typed by its dataset's contract, then
    joined (the preparation and evaluation services both read a set's rows this way)."""
    frames = {dataset: _typed(raw_store, datasets, batch_id)
              for dataset, batch_id in batches.items()}
    if spec.join is None:
        return frames[spec.inputs[0]]
    return join_inputs(frames, spec)


def _typed(
    raw_store: RawBatchStore, datasets: Mapping[str, DatasetContract], batch_id: str
) -> pd.DataFrame:
    contract = datasets[raw_store.manifest(batch_id).dataset]
    return read_batch(raw_store, batch_id, contract)


def _merge(left: pd.DataFrame, right: pd.DataFrame, name: str, join: JoinSpec) -> pd.DataFrame:
    for side, frame in (("joined inputs", left), (f"input {name}", right)):
        absent = [key for key in join.on if key not in frame.columns]
        if absent:
            raise InvalidInput(f"{side} lack the join keys {absent}")
    return left.merge(right, on=join.on, how=join.how, suffixes=("", f"_{name}"))
