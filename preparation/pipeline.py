"""Feature pipelines: a spec becomes a scikit-learn Pipeline; fitted, a versioned feature set.

Example::

    spec = parse_spec(yaml.safe_load(text)["features"])
    fitted = build_pipeline(spec).fit(frame, batch_ids=["9c1e..."])
    table = fitted.transform(frame)
    X, y = table[list(fitted.feature_names)], table[fitted.label]
    live = fitted.transform_online([{"nameOrig": "C1", "type": "TRANSFER", "amount": 9.5}])

Output: ``transform`` and ``transform_online`` return the features (``feature_names``, all
numeric, in that order) followed by the carried columns, entity key, timestamp and label,
copied unchanged from the input when it has them. Carried columns are never features: a
step that would read or write the label or the entity key fails at build time,
select_k_best never scores them, and they are kept out of ``feature_names``. The index is
the input's; row filters drop rows, so align on it.

Offline and online run the same fitted steps, with two differences:

- row filters (kind ``filter``) apply offline only; online, every row is scored;
- entity aggregates: when online rows carry all of a step's aggregate columns (what the
  online store holds, see ``latest_aggregates``), those are used as they are; otherwise
  they are computed from ``history``, the entities' earlier raw rows (none: no past).

Online rows may omit input columns (the label, say): those become missing values. Values
are converted to the dtypes seen at fit, so JSON strings for timestamps work.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import pandas as pd
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from common.errors import InvalidInput
from preparation.aggregates import EntityAggregate
from preparation.conform import conform
from preparation.online import RowStep, fast_frame
from preparation.registry import (
    StepContext,
    build_step,
    naming_step,
    row_form_of,
    step_label,
    step_name,
)
from preparation.spec import FeatureSpec, parse_spec
from preparation.transformers import RowFilter, require_numeric, to_utc

ID_LENGTH = 16
Mode = Literal["fit", "offline", "online"]
Records: TypeAlias = Sequence[Mapping[str, Any]] | pd.DataFrame
Indexed: TypeAlias = tuple[int, EntityAggregate]


class SkewWarning(UserWarning):
    """The spec's online transform cannot match its offline transform exactly."""


def feature_set_id(spec: FeatureSpec, batch_ids: Iterable[str]) -> str:
    """sha256 prefix of the canonical JSON of the spec and the sorted, distinct batch ids."""
    canonical = json.dumps({"batch_ids": _batch_ids(batch_ids),
                            "spec": spec.model_dump(mode="json")},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:ID_LENGTH]


def build_pipeline(spec: FeatureSpec | Mapping[str, Any]) -> FeaturePipeline:
    """Validate the spec and every step against the registry; errors name the step."""
    spec = parse_spec(spec)
    context = StepContext(spec.entity_key, spec.timestamp, spec.label)
    steps = [(step_name(i, step.kind), build_step(i, step.kind, step.params, context))
             for i, step in enumerate(spec.steps)]
    _warn_on_skew(spec)
    return FeaturePipeline(spec, Pipeline(steps or [("0_identity", FunctionTransformer())]))


@dataclass(frozen=True, eq=False)
class FeaturePipeline:
    """An unfitted feature pipeline. ``fit`` returns a new ``FittedFeatureSet``, not self:
    a fitted feature set is an immutable, versioned artefact of a spec and its inputs."""

    spec: FeatureSpec
    pipeline: Pipeline

    def fit(self, frame: pd.DataFrame, batch_ids: Iterable[str] = ()) -> FittedFeatureSet:
        """Fit every step on ``frame`` (the joined inputs) made from ``batch_ids``."""
        pipeline = clone(self.pipeline)
        out = _run(pipeline, _unique_index(frame), "fit")
        return FittedFeatureSet(
            spec=self.spec, pipeline=pipeline, feature_set_id=feature_set_id(self.spec, batch_ids),
            batch_ids=tuple(_batch_ids(batch_ids)), feature_names=feature_names_of(out, self.spec),
            input_dtypes={str(c): str(t) for c, t in frame.dtypes.items()},
        )


@dataclass(frozen=True, eq=False)
class FittedFeatureSet:
    """A fitted pipeline with its spec, id, input batches and output feature names."""

    spec: FeatureSpec
    pipeline: Pipeline
    feature_set_id: str
    batch_ids: tuple[str, ...]
    feature_names: tuple[str, ...]
    input_dtypes: Mapping[str, str]

    @property
    def label(self) -> str | None:
        return self.spec.label

    @property
    def entity_key(self) -> str | None:
        return self.spec.entity_key

    @property
    def timestamp(self) -> str | None:
        return self.spec.timestamp

    @property
    def carried(self) -> tuple[str, ...]:
        """Entity key, timestamp and label: carried beside the features, never features."""
        return StepContext(self.entity_key, self.timestamp, self.label).carried

    @property
    def aggregate_columns(self) -> list[str]:
        """The entity-aggregate columns, which the online store holds per entity."""
        return [c for _, step in self._aggregate_steps() for c in step.output_names()]

    def row_forms(self) -> list[RowStep | None]:
        """Each fitted step's row form, as its kind declares it (None: it has none)."""
        return [row_form_of(name, step) for name, step in self.pipeline.steps]

    def transform(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Offline: every step, row filters included; features then carried columns."""
        out = _run(self.pipeline, _unique_index(frame), "offline")
        return self._output(out, frame, self.carried)

    def transform_online(self, records: Records, history: Records | None = None, *,
                         fast: bool = True) -> pd.DataFrame:
        """Scoring time: the same fitted steps on raw rows, without row filters.

        Aggregate columns the rows carry are used as they are; missing ones are computed
        from ``history``: raw rows strictly earlier than ``records`` (not the records
        themselves, or a count window would see them twice); none means no past.
        A few records without history take the steps' compiled row forms
        (``preparation.online``), which give the same frame; ``fast=False`` runs the
        pandas steps, the reference.
        """
        if fast and history is None and (out := fast_frame(self, records)) is not None:
            return out
        frame, carried = self._online_frame(records)
        past = None if history is None else self._online_frame(history)[0]
        return self._output(self._run_online(frame, past), frame, carried)

    def conform(self, records: Records) -> pd.DataFrame:
        """Rows as the steps read them: the fit-time input columns in the fit-time dtypes."""
        return self._online_frame(records)[0]

    def run_until(self, frame: pd.DataFrame, stop: int, mode: Mode = "offline") -> pd.DataFrame:
        """``frame`` (conformed) after the steps before ``stop``; offline, rows may drop."""
        return _run(self.pipeline, _unique_index(frame), mode, stop)

    def latest_aggregates(self, history: Records, at: Any = None) -> pd.DataFrame:
        """Per entity in ``history``, the aggregate columns a new row at ``at`` would get.

        What the online store holds for each entity. ``at`` (a timestamp) defaults to
        just after the latest history row; time-window values are right only at ``at``.
        """
        steps = self._aggregate_steps()
        if not steps:
            raise InvalidInput(f"feature set {self.feature_set_id} has no entity aggregates")
        past = self._online_frame(history)[0]
        probes = self._probes(past, at)
        # One run up to the last step of each block of consecutive aggregate steps: such a
        # step only adds its own columns, so its block-mates' values are what they would
        # be with the run stopped right after them (a run over past + probes is the cost).
        parts = [self._run_online(probes, past, stop=block[-1][0] + 1)[
                     [c for _, step in block for c in step.output_names()]]
                 for block in _consecutive(steps)]
        return pd.concat(parts, axis=1).set_axis(pd.Index(probes[self.entity_key]))

    def transform_and_latest(self, frame: pd.DataFrame, at: Any = None
                             ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(transform(frame), latest_aggregates(frame, at))``, from one run where that
        gives the same values: each aggregate step also computes its probes (one per entity)
        beside the frame's rows, so the history is not run through the steps again. ``at``
        defaults to just after the frame's last row (a part of a batch passes the batch's).

        That needs the offline run to see the rows the online run would: no row filter
        before an aggregate step, the fit-time dtypes, no aggregate columns in ``frame``;
        otherwise the two are computed apart.
        """
        steps = self._aggregate_steps()
        if not steps:
            raise InvalidInput(f"feature set {self.feature_set_id} has no entity aggregates")
        if not self._one_run(frame, steps[-1][0]):
            return self.transform(frame), self.latest_aggregates(frame, at)
        parts: dict[int, pd.DataFrame] = {}
        when = self._at(frame) if at is None else pd.Timestamp(at)
        out = _run(self.pipeline, _unique_index(frame), "offline", latest=(when, parts))
        latest = pd.concat([parts[index] for index, _ in steps], axis=1)
        return self._output(out, frame, self.carried), latest

    def _one_run(self, frame: pd.DataFrame, last_aggregate: int) -> bool:
        filters = any(isinstance(step, RowFilter)
                      for _, step in self.pipeline.steps[:last_aggregate])
        same_types = all(c in frame.columns and str(frame[c].dtype) == dtype
                         for c, dtype in self.input_dtypes.items())
        carries = any(c in frame.columns for c in self.aggregate_columns)
        return not filters and same_types and not carries and not frame.empty

    def _at(self, frame: pd.DataFrame) -> pd.Timestamp | None:
        """When ``latest_aggregates`` puts its probes by default: just after the last row."""
        if not self.timestamp:
            return None
        return to_utc(frame[self.timestamp]).max() + pd.Timedelta(1, "ns")

    def _aggregate_steps(self) -> list[Indexed]:
        steps = enumerate(step for _, step in self.pipeline.steps)
        return [(index, step) for index, step in steps if isinstance(step, EntityAggregate)]

    def _online_frame(self, records: Records) -> tuple[pd.DataFrame, list[str]]:
        frame = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
        carried = [c for c in self.carried if c in frame.columns]
        return conform(_unique_index(frame), self.input_dtypes), carried

    def _run_online(self, frame: pd.DataFrame, past: pd.DataFrame | None,
                    stop: int | None = None) -> pd.DataFrame:
        if past is None:
            return _run(self.pipeline, frame, "online", stop)
        with warnings.catch_warnings():
            # Both frames were conformed to the fit-time dtypes, so pandas' coming change
            # to all-NA columns in concat cannot change the result's dtypes here.
            warnings.simplefilter("ignore", FutureWarning)
            both = pd.concat([past, frame], ignore_index=True)
        out = _run(self.pipeline, both, "online", stop).iloc[len(past):]
        return out.set_axis(frame.index)  # online steps never drop rows

    def _probes(self, past: pd.DataFrame, at: Any) -> pd.DataFrame:
        key, timestamp = self.entity_key, self.timestamp
        probes = pd.DataFrame({key: past[key].dropna().unique()})
        if timestamp:
            latest = to_utc(past[timestamp]).max() + pd.Timedelta(1, "ns")
            probes[timestamp] = latest if at is None else pd.Timestamp(at)
        return conform(probes, self.input_dtypes)

    def _output(self, out: pd.DataFrame, source: pd.DataFrame,
                carried: Sequence[str]) -> pd.DataFrame:
        names = list(self.feature_names)
        features = out.reindex(columns=names) if out.empty else out[names]
        return pd.concat([features, source.loc[features.index, list(carried)]], axis=1)


def _consecutive(steps: list[Indexed]) -> list[list[Indexed]]:
    """Indexed steps grouped into blocks of consecutive indices, in order."""
    blocks: list[list[Indexed]] = []
    for index, step in steps:
        if blocks and blocks[-1][-1][0] == index - 1:
            blocks[-1].append((index, step))
        else:
            blocks.append([(index, step)])
    return blocks


def _run(pipeline: Pipeline, frame: pd.DataFrame, mode: Mode, stop: int | None = None,
         latest: tuple[pd.Timestamp | None, dict[int, pd.DataFrame]] | None = None
         ) -> pd.DataFrame:
    """Run the steps up to ``stop``; with ``latest`` (a probe time and a dict), each entity
    aggregate step also puts its latest values per entity in the dict, by step index."""
    for name, step in pipeline.steps[:stop]:
        if frame.empty and mode != "fit":
            break  # filtered out offline; scikit-learn refuses empty frames
        index, kind = name.split("_", 1)
        with naming_step(step_label(int(index), kind)):
            if latest is not None and isinstance(step, EntityAggregate):
                frame, values = step.transform_and_latest(frame, latest[0])
                latest[1][int(index)] = values
            else:
                frame = _apply(step, frame, mode)
    return frame


def _apply(step: Any, frame: pd.DataFrame, mode: Mode) -> pd.DataFrame:
    if mode == "fit" and frame.empty:
        raise InvalidInput("no rows left to fit on")
    if mode == "fit":
        return step.fit_transform(frame)
    if mode == "online":
        return getattr(step, "transform_online", step.transform)(frame)
    return step.transform(frame)


def _batch_ids(batch_ids: Iterable[str]) -> list[str]:
    if isinstance(batch_ids, str):
        raise InvalidInput(f"batch_ids must be a list of ids, not the string {batch_ids!r}")
    return sorted(set(batch_ids))


def _unique_index(frame: pd.DataFrame) -> pd.DataFrame:
    if not frame.index.is_unique:
        raise InvalidInput("the frame's index has duplicates; reset_index() it first")
    return frame


def feature_names_of(out: pd.DataFrame, spec: FeatureSpec) -> tuple[str, ...]:
    """The feature columns of the steps' output ``out`` (all numeric, or ``InvalidInput``)."""
    carried = StepContext(spec.entity_key, spec.timestamp, spec.label).carried
    names = [str(c) for c in out.columns if c not in carried]
    with naming_step(f"feature spec {spec.name}"):
        if not names:
            raise InvalidInput("no feature columns are left after the steps")
        require_numeric(out[names], "features must be numbers: one_hot or drop them")
    return tuple(names)


def _warn_on_skew(spec: FeatureSpec) -> None:
    kinds = [step.kind for step in spec.steps]
    if "filter" in kinds and "entity_aggregate" in kinds[kinds.index("filter"):]:
        warnings.warn(SkewWarning(
            f"feature spec {spec.name}: a filter comes before an entity_aggregate; online, "
            "rows are never filtered, so served aggregates would count rows training did not"
        ), stacklevel=3)
