"""Preparation on a Dask cluster: the same fitted feature set and features as pandas gives.

The batch is read a piece per task (``RawBatchStore.pieces``: a part, or a row group),
each row indexed by its batch position, so the split takes the same rows as on pandas
(``segregation.partitioned``). The fit goes step by step over the training part, each
fitted step's transform added to the (lazy) rows before the next is fitted:

- a step that learns nothing from the values (ratio, difference, date_parts, log, drop,
  filter, entity_aggregate, an impute with a constant) is fitted on a sample of rows, which
  gives it the same columns and checks as the whole frame;
- impute (mean, most_frequent), scale (standard, minmax), one_hot and select_k_best (chi2)
  combine statistics of every partition (sums and counts, means and squared deviations,
  minima and maxima, value counts, class sums), then their fitted estimators are those
  pandas fits, with those statistics in place: the feature set is the same object;
- impute with the median and select_k_best with mutual_info need every value at once:
  the columns they read are gathered in this process (the steps that do not scale).

With entity aggregates the rows are first moved so that each entity's rows are in one
partition, in batch order, so every aggregate is exact; the transform then runs the
fitted feature set partition by partition, the rows go back to batch order and each
partition is written as a part of the offline feature set by the worker that holds it;
every entity's latest aggregates, for the online store, are written beside them as parts
too (``batch_states_on_cluster`` builds the online path's entity state the same way).
Statistics combined across partitions differ from one pass over all rows only by
floating-point rounding (~1e-15).

Example::

    prepared = prepare_on_cluster(client, raw_store, offline, config, fsid, batches)
    prepared.fitted                  # a FittedFeatureSet, as FeaturePipeline.fit gives
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.feature_selection import SelectKBest
from sklearn.feature_selection._univariate_selection import _chisquare
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, StandardScaler
from sklearn.preprocessing._data import _handle_zeros_in_scale, _is_constant_feature

from common.errors import InvalidInput
from common.stores import OfflineFeatureStore, RawBatchStore, RawPiece, latest_rows
from common.stores._fs import DataRoot
from ingestion.contract import DatasetContract, typing_id
from preparation.aggregates import EntityAggregate
from preparation.pipeline import (
    FeaturePipeline,
    FittedFeatureSet,
    build_pipeline,
    feature_names_of,
    feature_set_id,
)
from preparation.registry import naming_step, step_label
from preparation.spec import PreparationSections
from preparation.streaming import StreamPlan
from preparation.transformers import (
    SCORE_FUNCS,
    KBestColumns,
    OnColumns,
    require_columns,
    require_numeric,
    to_utc,
)
from segregation.strategies import STRATEGIES, train_rows

if TYPE_CHECKING:
    import dask.dataframe as dd
    from distributed import Client

log = logging.getLogger(__name__)
SAMPLE_ROWS = 1_000
"""Rows a step that learns nothing from the values is fitted on (its columns and checks)."""
ROW = "__row__"


class NotDistributable(Exception):
    """This feature set is prepared on the pandas path (the reason says why)."""


@dataclass(frozen=True)
class Prepared:
    """What the cluster made: the fitted set, the written parts, the online rows."""

    fitted: FittedFeatureSet
    rows: int
    columns: dict[str, str]
    online: pd.DataFrame | None
    online_timestamp: str | None
    fit_rows: int


def prepare_on_cluster(client: Client, raw_store: RawBatchStore, offline: OfflineFeatureStore,
                       config: PreparationSections, fsid: str, batches: Mapping[str, str]
                       ) -> Prepared:
    """Fit the feature set on the training part, transform every row and write the offline
    feature set's parts on the cluster; ``NotDistributable`` for what only pandas does
    (several inputs joined, a batch not typed by its contract, a custom or shuffled
    split). The caller saves the fitted set and writes the record that completes the set.
    """
    spec = config.features
    dataset = _single_input(config)
    contract = config.datasets[dataset]
    with plain_strings():
        frame = read_batch_dask(client, raw_store, batches[dataset], contract)
        train = _train_part(frame, config)
        fitted = fit_on_cluster(build_pipeline(spec), train, batches.values(), client)
        written = write_features(client, fitted, frame, offline, fsid)
    fit_rows = train_rows(sum(batch_lengths(frame)), config.split.ratio)  # as the split
    return Prepared(fitted, written.rows, written.columns, written.online,
                    None if fitted.aggregate_columns else fitted.timestamp, fit_rows)


def _single_input(config: PreparationSections) -> str:
    if len(config.features.inputs) != 1:
        raise NotDistributable("a feature set of several joined inputs")
    split = config.split
    if split.strategy not in STRATEGIES or split.shuffle:
        raise NotDistributable(f"split strategy {split.strategy!r}"
                               f"{' with shuffle' if split.shuffle else ''}")
    return config.features.inputs[0]


class plain_strings:
    """Dask would turn text columns into pyarrow strings; pandas reads them as they are."""

    def __enter__(self) -> None:
        import dask

        self._config = dask.config.set({"dataframe.convert-string": False})
        self._config.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._config.__exit__(*exc)


# -- reading -------------------------------------------------------------------------------

def read_batch_dask(client: Client, raw_store: RawBatchStore, batch_id: str,
                    contract: DatasetContract) -> dd.DataFrame:
    """A typed raw batch as a Dask frame, a piece per partition, indexed by batch
    position, with the dtypes ``ingestion.contract.read_batch`` gives (a category column's
    categories: every piece's, sorted)."""
    import dask.dataframe as dd

    batch = raw_store.manifest(batch_id)
    if batch.typed_by != typing_id(contract):
        raise NotDistributable(f"raw batch {batch_id} was not typed by its contract as stored")
    pieces = [p for p in raw_store.pieces(batch_id) if p.rows]
    if not pieces:
        raise NotDistributable(f"raw batch {batch_id} has no rows")
    names = [n for n, kind in contract.columns.items() if kind == "category"]
    found = client.gather(client.map(_categories, pieces, root=raw_store.root, columns=names,
                                     pure=False))
    categories = {n: sorted(set().union(*(f[n] for f in found))) for n in names}
    read = PieceReader(raw_store.root, categories)
    divisions = [p.first_row for p in pieces] + [pieces[-1].first_row + pieces[-1].rows - 1]
    return dd.from_map(read, pieces, meta=read(pieces[0]).iloc[:0], divisions=divisions,
                       enforce_metadata=False)


def _categories(piece: RawPiece, root: str, columns: list[str]) -> dict[str, list[Any]]:
    if not columns:
        return {}
    frame = RawBatchStore(root).read_piece(piece, columns=columns)
    return {c: list(frame[c].cat.categories) for c in columns}


@dataclass(frozen=True)
class PieceReader:
    """Reads a raw piece where the task runs, with the batch's categories; of the
    ``columns`` a computation uses only (Dask passes them: a Parquet reads no other)."""

    root: str
    categories: Mapping[str, list[Any]]

    def __call__(self, piece: RawPiece, columns: list[str] | None = None) -> pd.DataFrame:
        frame = RawBatchStore(self.root).read_piece(piece, columns=columns)
        for name, values in self.categories.items():
            if name in frame.columns:
                frame[name] = frame[name].cat.set_categories(values)
        return frame


def read_features_dask(offline: OfflineFeatureStore, feature_set_id: str,
                       columns: list[str] | None = None) -> dd.DataFrame:
    """A stored feature set as a Dask frame, a Parquet row group per partition (of the one
    file, or of each part in order), each row indexed as ``offline.read`` indexes it.

    Unlike ``OfflineFeatureStore.read_dask`` (whose training and evaluation use positions,
    not the index), the index is right in a file of several row groups whose frame was
    written with a RangeIndex (a set pandas wrote as one file, of more than a row group:
    over ~1M rows): pyarrow keeps such an index as a range in the file's metadata, and
    reading a row group alone gives it a new index from 0.
    """
    import dask
    import dask.dataframe as dd
    import pyarrow.parquet as pq

    offline.metadata(feature_set_id)  # NotFound names it
    root = DataRoot(offline.root)
    path = f"features/{feature_set_id}/features.parquet"
    files = root.glob(f"{path}/part-*.parquet") if root.fs.isdir(root.path(path)) else [path]
    parts, meta = [], None
    for file in files:
        with root.open(file) as handle:
            footer = pq.ParquetFile(handle)
            if meta is None:
                table = footer.schema_arrow.empty_table()
                meta = (table.select(columns) if columns else table).to_pandas().iloc[:0]
            first = 0
            for group in range(footer.num_row_groups):
                parts.append(dask.delayed(_row_group)(root.uri(file), group, first, columns))
                first += footer.metadata.row_group(group).num_rows
    return dd.from_delayed(parts, meta=meta, verify_meta=False)


def _row_group(uri: str, group: int, first: int, columns: list[str] | None) -> pd.DataFrame:
    """Row group ``group`` of a Parquet file, whose first row is row ``first`` of the
    file, indexed as the whole file's frame is."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as handle:
        file = pq.ParquetFile(handle)
        frame = file.read_row_group(group, columns=columns,
                                    use_pandas_metadata=True).to_pandas()
        stored = (file.schema_arrow.pandas_metadata or {}).get("index_columns", [])
    if stored and not isinstance(stored[0], dict):
        return frame  # the index was stored as a column: read back as it was
    # A range kept in the metadata (or no index at all: the positions, as pandas reads it).
    kept = stored[0] if stored else {"start": 0, "step": 1}
    start, step = kept["start"] + kept["step"] * first, kept["step"]
    return frame.set_axis(pd.RangeIndex(start, start + step * len(frame), step))


def _train_part(frame: dd.DataFrame, config: PreparationSections) -> dd.DataFrame:
    from segregation.partitioned import split_partitioned

    return split_partitioned(frame, config.split, batch_lengths(frame)).train


def batch_lengths(frame: dd.DataFrame) -> list[int]:
    """Rows of each partition of a ``read_batch_dask`` frame, from its divisions (batch
    positions: the first row of each partition, and the last row)."""
    starts = list(frame.divisions)
    return [b - a for a, b in zip(starts[:-2], starts[1:-1], strict=True)] + [
        starts[-1] - starts[-2] + 1]


# -- fitting -------------------------------------------------------------------------------

def fit_on_cluster(pipeline: FeaturePipeline, train: dd.DataFrame, batch_ids: Any,
                   client: Client) -> FittedFeatureSet:
    """``pipeline.fit`` of the training part, a step at a time on the cluster: the same
    fitted set pandas fits. The steps' transforms stay lazy; the rows are persisted only
    before a step that needs statistics of them all."""
    steps = clone(pipeline.pipeline)
    key = pipeline.spec.entity_key
    has_aggregates = any(isinstance(s, EntityAggregate) for _, s in steps.steps)
    current = by_entity(train, key) if has_aggregates and key else train
    # Sampled before the move: a sample of the moved rows would compute the whole move
    # (each partition takes rows of every piece) only to be thrown away.
    sample = _sample(train, client)
    for name, step in steps.steps:
        index, kind = name.split("_", 1)
        with naming_step(step_label(int(index), kind)):
            if sample.empty:  # a filter may have emptied the sample, not every partition
                sample = _sample(current, client)
            if sample.empty:
                raise InvalidInput("no rows left to fit on")
            if _fit_kind(step) is not None:
                current = client.persist(current)
            _fit_step(step, current, sample, client)
            # A sample of the rows after the step: their columns and dtypes, not values.
            sample = step.transform(sample)
            meta = sample.iloc[:0]
            current = current.map_partitions(_transform_step, step, meta, meta=meta)
    out = sample if len(sample) else _sample(current, client)
    return FittedFeatureSet(
        spec=pipeline.spec, pipeline=steps,
        feature_set_id=feature_set_id(pipeline.spec, batch_ids),
        batch_ids=tuple(sorted(set(batch_ids))),
        feature_names=feature_names_of(out, pipeline.spec),
        input_dtypes={str(c): str(t) for c, t in train._meta.dtypes.items()})


def by_entity(frame: dd.DataFrame, key: str | None) -> dd.DataFrame:
    """Each entity's rows in one partition, in batch order (the index), so the entity
    aggregates of a partition are those of the whole frame."""
    if key is None:
        return frame
    moved = frame.shuffle(on=key, npartitions=frame.npartitions)
    return moved.map_partitions(_sorted_by_position, meta=frame._meta)


def _sorted_by_position(part: pd.DataFrame) -> pd.DataFrame:
    return part.sort_index(kind="stable")


def _sample(frame: dd.DataFrame, client: Client) -> pd.DataFrame:
    """The first rows, from the first partition when it holds enough (a head over every
    partition computes them all), else from all of them."""
    head = client.compute(frame.head(SAMPLE_ROWS, npartitions=1, compute=False), sync=True)
    if len(head) >= SAMPLE_ROWS or frame.npartitions == 1:
        return head  # type: ignore[no-any-return]
    whole = frame.head(SAMPLE_ROWS, npartitions=-1, compute=False)
    return client.compute(whole, sync=True)  # type: ignore[no-any-return]


def _transform_step(part: pd.DataFrame, step: Any, meta: pd.DataFrame) -> pd.DataFrame:
    return meta.copy() if part.empty else step.transform(part)


def _fit_step(step: Any, current: dd.DataFrame, sample: pd.DataFrame, client: Client) -> None:
    """Fit one step in place, on statistics of every partition where it needs them."""
    kind = _fit_kind(step)
    fit = None if kind is None else _FITTERS[kind]
    if fit is None:
        step.fit(sample)  # learns the columns and checks them, nothing from the values
    else:
        fit(step, current, sample, client)


def _fit_kind(step: Any) -> str | None:
    if isinstance(step, KBestColumns):
        return "chi2" if step.score_func == "chi2" else "gather"
    if not isinstance(step, OnColumns):
        return None
    estimator = step.estimator
    if isinstance(estimator, SimpleImputer):
        known = {"mean": "mean", "most_frequent": "most_frequent", "constant": None}
        return known.get(estimator.strategy, "gather")
    if isinstance(estimator, StandardScaler):
        return "standard"
    if isinstance(estimator, MinMaxScaler):
        return "minmax"
    if isinstance(estimator, OneHotEncoder):
        return "categories"
    return None


def _partials(current: dd.DataFrame, client: Client, work: Callable[..., Any],
              *args: Any) -> list[Any]:
    """``work(partition, *args)`` of every partition, gathered here (small results)."""
    import dask

    tasks = [dask.delayed(work)(part, *args) for part in current.to_delayed()]
    return list(client.compute(tasks, sync=True))


def _numbers(part: pd.DataFrame, columns: list[str]) -> np.ndarray:
    return part[columns].to_numpy(dtype=np.float64, na_value=np.nan)


# impute: mean, most_frequent ---------------------------------------------------------------

def _sums(part: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    values = _numbers(part, columns)
    return np.nansum(values, axis=0), (~np.isnan(values)).sum(axis=0)


def _fit_mean(step: OnColumns, current: dd.DataFrame, sample: pd.DataFrame,
              client: Client) -> None:
    found = _partials(current, client, _sums, list(step.columns))
    total = np.sum([s for s, _ in found], axis=0)
    count = np.sum([c for _, c in found], axis=0)
    step.fit(sample)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(count > 0, total / np.maximum(count, 1), 0.0)  # keep_empty_features
    step.estimator_.statistics_ = means.astype(step.estimator_.statistics_.dtype)


def _counts(part: pd.DataFrame, columns: list[str]) -> dict[str, pd.Series]:
    return {c: part[c].value_counts(dropna=True) for c in columns}


def _fit_most_frequent(step: OnColumns, current: dd.DataFrame, sample: pd.DataFrame,
                       client: Client) -> None:
    columns = list(step.columns)
    found = _partials(current, client, _counts, columns)
    modes = []
    for column in columns:
        counts = pd.concat([f[column] for f in found]).groupby(level=0, sort=False).sum()
        if counts.empty:
            return _fit_gathered(step, current, sample, client)  # all missing: as pandas
        top = counts[counts == counts.max()].index
        modes.append(min(top))  # scikit-learn's tie-break: the smallest value
    step.fit(sample)
    dtype = step.estimator_.statistics_.dtype
    step.estimator_.statistics_ = np.asarray(modes, dtype=dtype)
    return None


# scale: standard, minmax ------------------------------------------------------------------

def _moments(part: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, ...]:
    values = _numbers(part, columns)
    count = (~np.isnan(values)).sum(axis=0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column: no mean
        mean = np.nansum(values, axis=0) / count
        squares = np.nansum((values - mean) ** 2, axis=0)
    return count, np.where(count > 0, mean, 0.0), np.where(count > 0, squares, 0.0)


def combine_moments(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Counts, means and sums of squared deviations of parts, combined (Chan et al.)."""
    count, mean, squares = (np.asarray(x, dtype=np.float64) for x in parts[0])
    for other_count, other_mean, other_squares in parts[1:]:
        total = count + other_count
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other_mean - mean
            share = np.where(total > 0, other_count / total, 0.0)
            mean = mean + delta * share
            squares = squares + other_squares + delta ** 2 * count * share
        count = total
    return count, mean, squares


def _fit_standard(step: OnColumns, current: dd.DataFrame, sample: pd.DataFrame,
                  client: Client) -> None:
    count, mean, squares = combine_moments(
        _partials(current, client, _moments, list(step.columns)))
    step.fit(sample)
    scaler = step.estimator_
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(count > 0, squares / count, np.nan)
        mean = np.where(count > 0, mean, np.nan)
    seen = count.astype(np.int64)
    scaler.mean_, scaler.var_ = mean, var
    scaler.n_samples_seen_ = seen[0] if np.ptp(seen) == 0 else seen
    constant = _is_constant_feature(var, mean, seen)
    scaler.scale_ = _handle_zeros_in_scale(np.sqrt(var), copy=False, constant_mask=constant)


def _extremes(part: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    values = _numbers(part, columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-missing: NaN, as scikit-learn
        return np.nanmin(values, axis=0), np.nanmax(values, axis=0), len(part)


def _range_frame(current: dd.DataFrame, client: Client,
                 columns: list[str]) -> tuple[pd.DataFrame, int]:
    """Two rows, every column's minimum and maximum (what a min-max scaler learns from),
    and the number of rows."""
    found = [f for f in _partials(current, client, _extremes, columns) if f[2]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.nanmin([f[0] for f in found], axis=0)
        high = np.nanmax([f[1] for f in found], axis=0)
    return pd.DataFrame([low, high], columns=columns), sum(f[2] for f in found)


def _fit_minmax(step: OnColumns, current: dd.DataFrame, sample: pd.DataFrame,
                client: Client) -> None:
    extremes, rows = _range_frame(current, client, list(step.columns))
    step.fit(sample)
    step.estimator_ = clone(step.estimator).set_output(transform="pandas").fit(extremes)
    step.estimator_.n_samples_seen_ = rows


# one_hot ----------------------------------------------------------------------------------

def _distinct_rows(part: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Rows of ``part`` in which every value of ``columns`` appears at least once."""
    firsts = [part.drop_duplicates(subset=[c]) for c in columns]
    return pd.concat(firsts).loc[lambda f: ~f.index.duplicated()]


def _fit_categories(step: OnColumns, current: dd.DataFrame, sample: pd.DataFrame,
                    client: Client) -> None:
    # An encoder learns each column's distinct values and nothing else: rows holding every
    # one of them fit it as all rows do.
    columns = list(step.columns)
    rows = pd.concat(_partials(current, client, _distinct_rows, columns))
    step.fit(_distinct_rows(rows, columns))


# select_k_best: chi2 ----------------------------------------------------------------------

def _label_check(part: pd.DataFrame, label: str, features: list[str]) -> tuple[Any, ...]:
    values = _numbers(part, features)
    bad = ~np.isfinite(values).all(axis=0)
    return bad, bool(part[label].isna().any()), sorted(part[label].dropna().unique())


def _class_sums(part: pd.DataFrame, label: str, features: list[str], classes: list[Any],
                scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Per class, the sums of the min-max scaled features, as chi2 adds them up."""
    scaled = _numbers(part, features)
    scaled *= scale
    scaled += shift
    labels = part[label].to_numpy()
    return np.stack([scaled[labels == c].sum(axis=0) for c in classes])


def _fit_chi2(step: KBestColumns, current: dd.DataFrame, sample: pd.DataFrame,
              client: Client) -> None:
    features = [c for c in sample.columns if c not in step._kept()]
    require_columns(sample, [step.label])  # FrameStep.fit's checks, without its fit
    require_numeric(sample[features], "one_hot or drop them before select_k_best")
    step.feature_names_in_ = np.asarray(sample.columns, dtype=object)
    checks = _partials(current, client, _label_check, step.label, features)
    _refuse_bad_values(checks, features, step.label)
    classes = sorted(set().union(*(c[2] for c in checks)))
    if len(classes) < 2:
        return _fit_gathered(step, current, sample, client)
    extremes, rows = _range_frame(current, client, features)
    scaler = MinMaxScaler().fit(extremes)
    scaler.n_samples_seen_ = rows
    class_rows = _class_rows(current, client, step.label, classes)
    observed = np.sum(_partials(current, client, _class_sums, step.label, features, classes,
                                scaler.scale_, scaler.min_), axis=0)
    expected = np.outer(class_rows / rows, observed.sum(axis=0))
    scores, pvalues = _chisquare(observed, expected)
    step.selector_ = _selector(step, scaler, extremes, scores, pvalues)
    support = step.selector_[-1].get_support()
    step.selected_ = [c for c, keep in zip(features, support, strict=True) if keep]
    return None


def _class_rows(current: dd.DataFrame, client: Client, label: str,
                classes: list[Any]) -> np.ndarray:
    found = _partials(current, client, _label_counts, label)
    counts = pd.concat(found).groupby(level=0).sum()
    return np.asarray([counts.get(c, 0) for c in classes], dtype=np.float64)


def _label_counts(part: pd.DataFrame, label: str) -> pd.Series:
    return part[label].value_counts()


def _refuse_bad_values(checks: list[tuple[Any, ...]], features: list[str], label: str) -> None:
    bad = np.logical_or.reduce([c[0] for c in checks])
    if bad.any():
        named = [c for c, b in zip(features, bad, strict=True) if b]
        raise InvalidInput(f"columns {named} have missing or infinite values; impute them first")
    if any(c[1] for c in checks):
        raise InvalidInput(f"label '{label}' has missing values")


def _selector(step: KBestColumns, scaler: MinMaxScaler, extremes: pd.DataFrame,
              scores: np.ndarray, pvalues: np.ndarray) -> Any:
    """The fitted ``MinMaxScaler, SelectKBest`` pipeline, with the combined scores."""
    def given(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        return scores, pvalues

    selector = make_pipeline(MinMaxScaler(), SelectKBest(given, k=step.k))
    selector.steps[0] = (selector.steps[0][0], scaler)
    selector[-1].fit(scaler.transform(extremes), np.arange(len(extremes)))
    selector[-1].score_func = SCORE_FUNCS[step.score_func]  # as pandas builds it
    return selector


# gathered: median, mutual_info ------------------------------------------------------------

def _fit_gathered(step: Any, current: dd.DataFrame, sample: pd.DataFrame,
                  client: Client) -> None:
    """Fit on every row of the columns the step reads, gathered in this process."""
    if isinstance(step, KBestColumns):
        columns = [c for c in sample.columns if c not in step.exclude]
    else:
        columns = list(step.columns)
    log.info("fitting %s on all %s rows gathered in this process", type(step).__name__,
             "training")
    gathered = client.compute(current[columns], sync=True)
    step.fit(gathered)
    step.feature_names_in_ = np.asarray(sample.columns, dtype=object)


_FITTERS: dict[str, Callable[..., Any]] = {
    "mean": _fit_mean, "most_frequent": _fit_most_frequent, "standard": _fit_standard,
    "minmax": _fit_minmax, "categories": _fit_categories, "chi2": _fit_chi2,
    "gather": _fit_gathered,
}


# -- the online path's entity state --------------------------------------------------------

def batch_states_on_cluster(client: Client, raw_store: RawBatchStore, contract: DatasetContract,
                            batch_id: str, plan: StreamPlan
                            ) -> Iterator[tuple[list[str], list[bytes]]]:
    """``plan.batch_states`` of a batch, computed on the cluster a partition of whole
    entities at a time and handed over one partition's states at a time (what
    ``EntityStateStore.write_batch_states`` takes: its entities are in no other part)."""
    import dask

    with plain_strings():
        frame = by_entity(read_batch_dask(client, raw_store, batch_id, contract),
                          plan.entity_key)
        tasks = [dask.delayed(_states)(part, plan, batch_id, contract.record_id)
                 for part in frame.to_delayed()]
        futures = client.compute(tasks)
    for future in futures:
        yield future.result()
        future.release()  # the worker forgets it: one part's states held at a time here


def _states(part: pd.DataFrame, plan: StreamPlan, batch_id: str,
            record_id: str | None) -> tuple[list[str], list[bytes]]:
    # The record ids the pandas path gives (``batch_record_ids``): the index is the row.
    ids = (part[record_id].astype(str).tolist() if record_id is not None
           else [f"{batch_id[:16]}.{row}" for row in part.index])
    return plan.batch_states(part, ids)


# -- transform and write -------------------------------------------------------------------

@dataclass(frozen=True)
class _Written:
    rows: int
    columns: dict[str, str]
    online: pd.DataFrame | None
    """Online rows for the caller to write (None: none, or the workers wrote them)."""


def write_features(client: Client, fitted: FittedFeatureSet, frame: dd.DataFrame,
                   offline: OfflineFeatureStore, fsid: str) -> _Written:
    """Transform every row (a partition of whole entities at a time), put the rows back in
    batch order and write each partition as a part of the offline set; returns the rows,
    the columns' dtypes and the online rows left to write (None without an entity key,
    and with entity aggregates, whose rows the workers write as parts)."""
    import dask
    import dask.dataframe as dd

    key = fitted.entity_key
    # Not persisted: the rows are moved once, in the graph that also writes them.
    moved = by_entity(frame, key) if fitted.aggregate_columns else frame
    at = _probe_time(frame, fitted, client)
    tasks = [dask.delayed(_transform_part, nout=2)(part, fitted, at)
             for part in moved.to_delayed()]
    features_meta = _features_meta(fitted, client, frame)
    features = dd.from_delayed([t[0] for t in tasks], meta=features_meta, verify_meta=False)
    online = [t[1] for t in tasks]
    ordered = in_batch_order(features, frame.divisions) if fitted.aggregate_columns else features
    offline.start_parts(fsid)
    parts = [dask.delayed(_write_part)(part, offline.root, fsid, number)
             for number, part in enumerate(ordered.to_delayed())]
    if fitted.aggregate_columns:  # each entity's row in one partition: written there
        online = [dask.delayed(_write_online)(rows, offline.root, fsid, number)
                  for number, rows in enumerate(online)]
    written, online_rows = client.compute([parts, online], sync=True)
    return _Written(sum(r for r, _ in written), _dtypes(written, features_meta),
                    _online(online_rows, fitted, key))


def _probe_time(frame: dd.DataFrame, fitted: FittedFeatureSet,
                client: Client) -> pd.Timestamp | None:
    """When the latest aggregates are probed: just after the batch's last row (as pandas)."""
    if not fitted.aggregate_columns or not fitted.timestamp:
        return None
    latest = _partials(frame[[fitted.timestamp]], client, _latest_time, fitted.timestamp)
    found = [t for t in latest if not pd.isna(t)]
    return max(found) + pd.Timedelta(1, "ns") if found else None


def _latest_time(part: pd.DataFrame, column: str) -> Any:
    return to_utc(part[column]).max() if len(part) else pd.NaT


def _transform_part(part: pd.DataFrame, fitted: FittedFeatureSet,
                    at: pd.Timestamp | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    if part.empty:
        return fitted.transform(part.iloc[:0]), None
    if fitted.aggregate_columns:
        features, latest = fitted.transform_and_latest(part, at=at)
        return features, latest.reset_index()
    features = fitted.transform(part)
    if fitted.entity_key is None:
        return features, None
    return features, _latest_rows(features, fitted)


def _latest_rows(features: pd.DataFrame, fitted: FittedFeatureSet) -> pd.DataFrame:
    """Each entity's latest row, as the pandas path keeps it for the online store: of
    rows in batch order, latest by time, the last one on a tie."""
    assert fitted.entity_key is not None
    online = features.drop(columns=[c for c in [fitted.label] if c])
    return latest_rows(online, fitted.entity_key, fitted.timestamp)


def _features_meta(fitted: FittedFeatureSet, client: Client,
                   frame: dd.DataFrame) -> pd.DataFrame:
    sample = _sample(frame, client)
    return fitted.transform(sample).iloc[:0]


def in_batch_order(features: dd.DataFrame, divisions: tuple[Any, ...]) -> dd.DataFrame:
    """Rows indexed by batch position back in batch order, partitioned as the batch's
    pieces are (``divisions``: the batch frame's)."""
    named = features.map_partitions(_row_column, meta=_row_column(features._meta))
    back = named.set_index(ROW, divisions=list(divisions))
    return back.map_partitions(_unnamed, meta=_unnamed(back._meta))


def _row_column(part: pd.DataFrame) -> pd.DataFrame:
    return part.rename_axis(ROW).reset_index()


def _unnamed(part: pd.DataFrame) -> pd.DataFrame:
    return part.rename_axis(None)


def _write_part(part: pd.DataFrame, root: str, fsid: str,
                number: int) -> tuple[int, dict[str, str]]:
    OfflineFeatureStore(root).write_part(fsid, number, part)
    return len(part), {str(c): str(t) for c, t in part.dtypes.items()}


def _write_online(rows: pd.DataFrame | None, root: str, fsid: str, number: int) -> None:
    if rows is not None and len(rows):
        OfflineFeatureStore(root).write_part(fsid, number, rows, online=True)


def _dtypes(written: list[tuple[int, dict[str, str]]], meta: pd.DataFrame) -> dict[str, str]:
    """The columns' dtypes: those of a part with rows (all agree), else the expected ones."""
    found = [dtypes for rows, dtypes in written if rows]
    if len({tuple(d.items()) for d in found}) > 1:
        raise InvalidInput(f"the feature set's parts disagree on dtypes: {found}")
    return found[0] if found else {str(c): str(t) for c, t in meta.dtypes.items()}


def _online(parts: list[pd.DataFrame | None], fitted: FittedFeatureSet,
            key: str | None) -> pd.DataFrame | None:
    """The online rows to write in this process: with aggregates none (the workers wrote
    them); else each entity's latest row of the partitions' latest rows, taken in batch
    order of the partitions, so a tie goes to the later row as in one frame."""
    found = [p for p in parts if p is not None]
    if key is None or fitted.aggregate_columns or not found:
        return None
    return latest_rows(pd.concat(found), key, fitted.timestamp)
