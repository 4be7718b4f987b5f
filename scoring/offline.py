"""Offline batch scoring: a model version over a raw batch or a feature set, in chunks. Pure
(but for the cluster's scorers, whose workers write the parts they score).

A raw batch goes through the model's own fitted feature set (its offline transform, row
filters and entity aggregates included, each row's aggregates from the entity's earlier
rows of the batch), then predict; a feature set that is the model's own is predicted
directly. Rows are processed ``chunk_rows`` at a time so memory stays bounded by a chunk's
features; a raw batch is cut into chunks by entity, so every entity's rows are transformed
together and the aggregates are exactly those of one pass over the whole batch.

The result has one row per scored row: ``row_id`` (the input row's index), ``entity_id``,
``score`` (the last class's probability), ``label``, ``probability_<class>`` per class and
``model_version``. Example::

    model = BatchModel("v3", estimator, fitted, list(fitted.feature_names))
    scores = score_raw(model, typed_raw_frame, chunk_rows=50_000)
    scores = score_features(model, feature_set_frame)         # already transformed

On a Dask cluster (``CONVEYOR_COMPUTE``) the same scores are made partition by partition
and written as partitioned Parquet by the workers, each entity's rows in one partition in
batch order: ``score_raw_on_cluster`` and ``score_features_on_cluster``::

    uri, rows = score_raw_on_cluster(client, model, raw_frame, BatchScoreStore(root), run_id)

``scoring.batch_scoring.BatchScoring`` chooses between the two by ``CONVEYOR_COMPUTE``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from common.errors import InvalidInput
from common.stores import BatchScoreStore

if TYPE_CHECKING:
    import dask.dataframe as dd
    from distributed import Client

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 50_000
Progress = Callable[[int, int, int], None]
"""Called after each chunk with (chunk number from 1, chunks, rows scored so far)."""


@dataclass(frozen=True)
class BatchModel:
    """A model version with its fitted feature set and the feature names it was trained on."""

    version: str
    estimator: Any
    features: Any  # preparation.FittedFeatureSet
    feature_names: Sequence[str]

    @property
    def feature_set_id(self) -> str:
        """The id of the feature set the model was trained on."""
        return str(self.features.feature_set_id)


def score_raw(
    model: BatchModel, frame: pd.DataFrame, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Score raw rows: the model's offline transform, then predict, chunk by chunk."""
    fitted = model.features
    chunks = entity_chunks(frame, fitted.entity_key, chunk_rows)
    return _score_chunks(model, (fitted.transform(chunk) for chunk in chunks),
                         _count(frame, chunk_rows), progress)


def score_features(
    model: BatchModel, frame: pd.DataFrame, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Score rows of the model's own feature set (already transformed), chunk by chunk."""
    _check_features(model, list(frame.columns))
    chunks = (frame.iloc[start:start + chunk_rows] for start in range(0, len(frame), chunk_rows))
    return _score_chunks(model, chunks, _count(frame, chunk_rows), progress)


def _check_features(model: BatchModel, columns: Sequence[str]) -> None:
    missing = [name for name in model.feature_names if name not in columns]
    if missing:
        raise InvalidInput(f"the feature set lacks features of model version {model.version}: "
                           f"{', '.join(missing)}")


def entity_chunks(
    frame: pd.DataFrame, entity_key: str | None, chunk_rows: int
) -> Iterator[pd.DataFrame]:
    """About ``chunk_rows`` rows at a time, every entity's rows in one chunk, in row order.

    Without an entity key the rows are cut in order.
    """
    if chunk_rows < 1:
        raise InvalidInput(f"chunk_rows must be at least 1, got {chunk_rows}")
    parts = _count(frame, chunk_rows)
    if entity_key is None:
        for start in range(0, len(frame), chunk_rows):
            yield frame.iloc[start:start + chunk_rows]
        return
    if entity_key not in frame.columns:
        raise InvalidInput(f"the rows have no entity key column '{entity_key}'")
    codes, _ = pd.factorize(frame[entity_key], use_na_sentinel=False)
    bucket = codes % parts
    for part in range(parts):
        yield frame[bucket == part]


def _count(frame: pd.DataFrame, chunk_rows: int) -> int:
    return max(1, math.ceil(len(frame) / chunk_rows))


def _score_chunks(
    model: BatchModel, chunks: Iterator[pd.DataFrame], count: int, progress: Progress | None
) -> pd.DataFrame:
    scored: list[pd.DataFrame] = []
    rows = 0
    for number, chunk in enumerate(chunks, start=1):
        scored.append(_predict(model, chunk))
        rows += len(chunk)
        if progress is not None:
            progress(number, count, rows)
    out = pd.concat(scored) if scored else _predict(model, pd.DataFrame())
    return out.sort_values("row_id", kind="stable").reset_index(drop=True)


def _predict(model: BatchModel, transformed: pd.DataFrame) -> pd.DataFrame:
    """The scores of transformed rows (features and carried columns), in their order."""
    names = list(model.feature_names)
    classes = [str(c) for c in model.estimator.classes_]
    proba = np.empty((0, len(classes)))
    if not transformed.empty:
        X = transformed[names].to_numpy(dtype=np.float64)  # float64 rows, as online
        proba = model.estimator.predict_proba(pd.DataFrame(X, columns=names))
    out = pd.DataFrame({
        "row_id": transformed.index.to_numpy(dtype=np.int64),
        "entity_id": _entities(transformed, model.features.entity_key),
        "score": proba[:, -1],
        "label": pd.array(np.asarray(classes, dtype=object)[np.argmax(proba, axis=1)],
                          dtype="string"),
    })
    for index, label in enumerate(classes):
        out[f"probability_{label}"] = proba[:, index]
    out["model_version"] = model.version
    return out


def _entities(transformed: pd.DataFrame, key: str | None) -> pd.arrays.StringArray:
    if key and key in transformed.columns:
        return pd.array(transformed[key].astype("string").to_numpy(), dtype="string")
    return pd.array([None] * len(transformed), dtype="string")


# -- on a Dask cluster (CONVEYOR_COMPUTE) ----------------------------------------------------

def score_raw_on_cluster(client: Client, model: BatchModel, frame: dd.DataFrame,
                         scores: BatchScoreStore, run_id: str, *,
                         progress: Progress | None = None) -> tuple[str, int]:
    """``score_raw`` partition by partition on a Dask cluster, written as partitioned
    Parquet: each entity's rows moved into one partition in batch order (its aggregates
    are those of the whole batch), transformed and predicted there, the rows put back in
    batch order and each partition written as a part of the run by its worker (the run's
    record last). ``frame`` is the typed raw batch indexed by batch position
    (``preparation.distributed.read_batch_dask``). Returns the parts' URL and the rows;
    ``progress`` is called as each part is written (in the order they finish)."""
    from preparation.distributed import by_entity, in_batch_order

    moved = by_entity(frame, model.features.entity_key)
    meta = _predict(model, pd.DataFrame())
    scored = moved.map_partitions(_score_part, model, meta=meta.set_axis(meta["row_id"]))
    return _write_parts(client, in_batch_order(scored, frame.divisions), scores, run_id,
                        progress)


def score_features_on_cluster(client: Client, model: BatchModel, frame: dd.DataFrame,
                              scores: BatchScoreStore, run_id: str, *,
                              progress: Progress | None = None) -> tuple[str, int]:
    """``score_features`` partition by partition on a Dask cluster (``frame``: the model's
    feature set, ``preparation.distributed.read_features_dask``, whose index is the row
    id), written as partitioned Parquet."""
    _check_features(model, list(frame.columns))
    meta = _predict(model, pd.DataFrame())
    return _write_parts(client, frame.map_partitions(_predict_part, model, meta=meta), scores,
                        run_id, progress)


def _predict_part(part: pd.DataFrame, model: BatchModel) -> pd.DataFrame:
    return _predict(model, part)


def _score_part(part: pd.DataFrame, model: BatchModel) -> pd.DataFrame:
    """A partition's scores, indexed by batch position (``row_id``)."""
    out = _predict(model, model.features.transform(part) if len(part) else pd.DataFrame())
    return out.set_axis(out["row_id"].to_numpy())


def _write_parts(client: Client, scored: dd.DataFrame, scores: BatchScoreStore, run_id: str,
                 progress: Progress | None) -> tuple[str, int]:
    """Have the workers write every partition as a part, then the run's record. On a
    failure the parts written so far are removed; the record, written last, is what makes
    a run stored, so no reader ever sees a part of a run (a part a worker was still writing
    when the run failed may land afterwards: the retry's ``start_parts`` removes it)."""
    import dask
    from distributed import as_completed

    scores.start_parts(run_id)
    parts = scored.to_delayed()
    tasks = [dask.delayed(_write_part)(part, scores.root, run_id, number)
             for number, part in enumerate(parts)]
    futures = client.compute(tasks)
    rows = 0
    try:
        for done, future in enumerate(as_completed(futures, loop=client.loop), start=1):
            rows += future.result()
            future.release()
            if progress is not None:
                progress(done, len(tasks), rows)
    except BaseException:
        client.cancel(futures)
        scores.start_parts(run_id)  # nothing of the failed attempt stays
        raise
    return scores.finish_parts(run_id, rows, len(parts)), rows


def _write_part(part: pd.DataFrame, root: str, run_id: str, number: int) -> int:
    BatchScoreStore(root).write_part(run_id, number, part.reset_index(drop=True))
    return len(part)
