"""The compiled row path of the online transform gives exactly what the pandas path gives.

Parity is checked on many seeded random records per spec, for every registered step kind:
missing fields, None and NaN values, unseen categories, zero denominators, entities
without history, aggregates carried from the online store or not, integer and float
values, timestamps in several ISO 8601 forms and as datetimes, batches of a few rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from pandas.testing import assert_frame_equal
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from common.errors import InvalidInput
from preparation import FittedFeatureSet, build_pipeline
from preparation.online import OnlinePlan, compile_online, online_matrix
from preparation.registry import kind_of, known_kinds
from preparation.transformers import OnColumns
from tests.fixtures.pipeline import AGGREGATE_STEPS, AGGREGATES, paysim_accounts
from tests.fixtures.scoring import SPEC as SCORING_SPEC

FIXTURE = Path(__file__).parents[1] / "fixtures" / "pipeline.yaml"
BASE = {"name": "online", "inputs": ["transactions"], "entity_key": "nameOrig",
        "timestamp": "timestamp", "label": "isFraud"}
EVERY_KIND = {**BASE, "steps": [
    *AGGREGATE_STEPS,
    {"kind": "difference", "params": {"a": ["newbalanceOrig", "amount"],
                                      "b": "oldbalanceOrg", "name": "errorBalanceOrig"}},
    {"kind": "difference", "params": {"a": "step", "b": "isFlaggedFraud", "name": "steps"}},
    {"kind": "ratio", "params": {"a": "amount", "b": "oldbalanceOrg", "name": "share"}},
    {"kind": "date_parts", "params": {"column": "timestamp", "parts": [
        "year", "month", "day", "dayofweek", "dayofyear", "hour", "minute", "is_weekend"]}},
    {"kind": "log", "params": {"columns": ["amount"]}},
    {"kind": "one_hot", "params": {"columns": ["type"]}},
    {"kind": "drop", "params": {"columns": ["nameDest"]}},
    {"kind": "select_k_best", "params": {"k": 20}},
]}
OTHER_FORMS = {**BASE, "steps": [
    {"kind": "entity_aggregate", "params": {"column": "amount", "window": 3,
                                            "stats": ["sum", "mean", "count"]}},
    {"kind": "impute", "params": {"columns": ["nameOrig_amount_mean_last3", "oldbalanceOrg"],
                                  "strategy": "median"}},
    {"kind": "impute", "params": {"columns": ["newbalanceOrig"], "strategy": "mean"}},
    {"kind": "impute", "params": {"columns": ["step"], "strategy": "most_frequent"}},
    {"kind": "ratio", "params": {"a": "oldbalanceDest", "b": "newbalanceDest",
                                 "name": "destShare", "fill": -1.0}},
    {"kind": "scale", "params": {"columns": ["oldbalanceDest", "amount"], "method": "minmax"}},
    {"kind": "date_parts", "params": {"column": "timestamp", "parts": ["hour"], "keep": True}},
    {"kind": "one_hot", "params": {"columns": ["type", "isFlaggedFraud"]}},
    {"kind": "drop", "params": {"columns": ["nameDest", "timestamp"]}},
]}
NO_STEPS = {**BASE, "steps": [{"kind": "drop", "params": {"columns": ["nameDest", "type",
                                                                     "timestamp"]}}]}
TIME_FORMS = ("%Y-%m-%dT%H:%M:%S+00:00", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d %H:%M:%S",
              "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S.%f+02:00")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return paysim_accounts(500, seed=11, accounts=40)


def fixture_spec() -> dict[str, Any]:
    return yaml.safe_load(FIXTURE.read_text())["features"]


SPECS = {"every_kind": EVERY_KIND, "other_forms": OTHER_FORMS, "fixture": fixture_spec(),
         "scoring": SCORING_SPEC, "no_steps": NO_STEPS}


@pytest.fixture(scope="module", params=sorted(SPECS))
def fitted(request: pytest.FixtureRequest, frame: pd.DataFrame) -> FittedFeatureSet:
    return build_pipeline(SPECS[request.param]).fit(frame.iloc[:400], batch_ids=["b1"])


def random_record(frame: pd.DataFrame, fitted: FittedFeatureSet, rng: np.random.Generator,
                  form: int | None = None) -> dict[str, Any]:
    """A raw row as a request could bring it, with the awkward cases mixed in; its time as
    ``TIME_FORMS[form]``, a datetime past the last form, or a random one of these."""
    position = int(rng.integers(100, len(frame)))
    row = frame.drop(columns=["isFraud"]).iloc[position].to_dict()
    when = row["timestamp"] + pd.Timedelta(int(rng.integers(0, 3600)), "s")
    form = int(rng.integers(0, len(TIME_FORMS) + 1)) if form is None else form
    row["timestamp"] = when if form == len(TIME_FORMS) else when.strftime(TIME_FORMS[form])
    if rng.random() < 0.3:
        row["nameOrig"] = f"C-new-{rng.integers(1e9)}"  # an entity without history
    if rng.random() < 0.5 and fitted.aggregate_columns:  # what the online store holds
        store = fitted.latest_aggregates(frame.iloc[:position], at=when)
        if row["nameOrig"] in store.index:
            row |= store.loc[row["nameOrig"]].to_dict()
    for name in ("oldbalanceOrg", "newbalanceDest"):
        if rng.random() < 0.2:
            row[name] = 0.0 if rng.random() < 0.7 else 0  # zero denominators
    if rng.random() < 0.15:
        row["type"] = "WIRE"  # a category unseen at fit
    if rng.random() < 0.2:
        row["amount"] = int(rng.integers(0, 10_000))  # an integer where floats were seen
    for name in list(row):
        draw = rng.random()
        if name in ("nameOrig", "type"):
            continue
        if draw < 0.04:
            del row[name]  # a missing field
        elif draw < 0.07:
            row[name] = float("nan")
        elif draw < 0.09:
            row[name] = None
    return row


def reference(fitted: FittedFeatureSet, records: list[dict[str, Any]]) -> pd.DataFrame:
    return fitted.transform_online(records, fast=False)


def test_every_registered_kind_is_covered() -> None:
    covered = {step["kind"] for spec in SPECS.values() for step in spec["steps"]}
    assert covered == set(known_kinds())


@pytest.mark.parametrize("kind", known_kinds())
def test_each_registered_kind_declares_the_row_form_of_its_steps(
        kind: str, frame: pd.DataFrame) -> None:
    row_form = kind_of(kind).row_form
    assert row_form is not None, f"step kind {kind} declares no row form: scoring is slow"
    spec = next(s for s in SPECS.values() if any(step["kind"] == kind for step in s["steps"]))
    fitted = build_pipeline(spec).fit(frame.iloc[:400], batch_ids=["b1"])
    steps = [step for name, step in fitted.pipeline.steps if name.partition("_")[2] == kind]
    assert steps and all(row_form(step) is not None for step in steps)


def test_every_step_of_these_specs_has_a_row_form(fitted: FittedFeatureSet) -> None:
    assert compile_online(fitted).fast


def test_single_random_rows_give_the_pandas_matrix(
        fitted: FittedFeatureSet, frame: pd.DataFrame) -> None:
    rng, plan = np.random.default_rng(5), compile_online(fitted)
    fast_rows = 0
    for _ in range(200):
        record = random_record(frame, fitted, rng)
        try:
            expected = reference(fitted, [record])
        except (InvalidInput, ValueError) as exc:
            with pytest.raises(type(exc)):
                fitted.transform_online([record])
            assert plan.matrix([record]) is None  # the row path never answers an error
            continue
        if not fast_path_agrees(fitted, plan, [record], expected):
            continue
        fast_rows += 1
        assert_frame_equal(fitted.transform_online([record]), expected, check_exact=True)
    assert fast_rows >= 130  # the awkward cases above are modelled, not sent to pandas


def test_small_batches_give_the_pandas_frame(
        fitted: FittedFeatureSet, frame: pd.DataFrame) -> None:
    rng, plan = np.random.default_rng(8), compile_online(fitted)
    fast_batches = 0
    for _ in range(40):
        form = int(rng.integers(0, len(TIME_FORMS) + 1))  # one client, one time format
        records = [random_record(frame, fitted, rng, form)
                   for _ in range(int(rng.integers(2, 6)))]
        try:
            expected = reference(fitted, records)
        except (InvalidInput, ValueError):
            continue
        fast_batches += fast_path_agrees(fitted, plan, records, expected)
        assert_frame_equal(fitted.transform_online(records), expected, check_exact=True)
    assert fast_batches >= 15


def fast_path_agrees(fitted: FittedFeatureSet, plan: OnlinePlan, records: list[dict[str, Any]],
                     expected: pd.DataFrame) -> bool:
    """Whether the compiled row plan modelled the records (else pandas answers); where it
    did, its matrix must be the pandas transform's, to 1e-12."""
    matrix = plan.matrix(records)
    if matrix is None:
        return False
    np.testing.assert_allclose(matrix, expected[list(fitted.feature_names)].to_numpy(np.float64),
                               rtol=1e-12, atol=1e-12, equal_nan=True)
    return True


@pytest.mark.parametrize("change", [
    {"type": "WIRE"}, {"oldbalanceOrg": 0.0}, {"oldbalanceOrg": 0}, {"amount": float("nan")},
    {"nameOrig": "C-never-seen"}, {"timestamp": "2026-03-01T23:59:00Z"}, {"step": None},
], ids=lambda change: next(iter(change)))
def test_awkward_values_take_the_row_path(
        frame: pd.DataFrame, change: dict[str, Any]) -> None:
    fitted = build_pipeline(EVERY_KIND).fit(frame.iloc[:400], batch_ids=["b1"])
    record = {**frame.drop(columns="isFraud").iloc[450].to_dict(), **change}
    matrix = compile_online(fitted).matrix([record])

    assert matrix is not None
    expected = reference(fitted, [record])[list(fitted.feature_names)].to_numpy(np.float64)
    np.testing.assert_allclose(matrix, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_a_missing_field_becomes_a_missing_value(frame: pd.DataFrame) -> None:
    fitted = build_pipeline(EVERY_KIND).fit(frame.iloc[:400], batch_ids=["b1"])
    record = frame.drop(columns=["isFraud", "newbalanceOrig"]).iloc[450].to_dict()

    out = fitted.transform_online([record])

    assert np.isnan(out.loc[0, "errorBalanceOrig"])
    assert_frame_equal(out, reference(fitted, [record]), check_exact=True)


def test_rows_of_one_entity_without_aggregates_take_the_pandas_path(
        frame: pd.DataFrame) -> None:
    fitted = build_pipeline(EVERY_KIND).fit(frame.iloc[:400], batch_ids=["b1"])
    first, second = (frame.drop(columns="isFraud").iloc[i].to_dict() for i in (450, 451))
    records = [first, {**second, "nameOrig": first["nameOrig"]}]

    assert compile_online(fitted).matrix(records) is None  # the second sees the first
    out = fitted.transform_online(records)
    assert out.loc[1, "nameOrig_amount_count_48h"] != out.loc[0, "nameOrig_amount_count_48h"]


def test_a_batch_mixing_zoned_and_zoneless_times_takes_the_pandas_path(
        frame: pd.DataFrame) -> None:
    fitted = build_pipeline(EVERY_KIND).fit(frame.iloc[:400], batch_ids=["b1"])
    first, second = (frame.drop(columns="isFraud").iloc[i].to_dict() for i in (450, 460))
    records = [{**first, "timestamp": "2026-01-02T21:00:00+02:00"},
               {**second, "timestamp": "2026-01-02T21:00:00"}]  # pandas reads it at +02:00

    assert compile_online(fitted).matrix(records) is None
    assert_frame_equal(fitted.transform_online(records), reference(fitted, records))


def test_errors_are_the_pandas_paths(frame: pd.DataFrame) -> None:
    fitted = build_pipeline(EVERY_KIND).fit(frame.iloc[:400], batch_ids=["b1"])
    record = frame.drop(columns="isFraud").iloc[450].to_dict()

    with pytest.raises(InvalidInput, match="column 'amount' holds values that are not numbers"):
        online_matrix(fitted, [{**record, "amount": "lots"}], fitted.feature_names)
    with pytest.raises(InvalidInput, match="not timestamps"):
        fitted.transform_online([{**record, "timestamp": "yesterday"}])
    with pytest.raises(InvalidInput, match="log needs non-negative values"):
        fitted.transform_online([{**record, "amount": -1.0}])
    with pytest.raises(InvalidInput, match="rows carry some aggregates but not"):
        fitted.transform_online([{**record, AGGREGATES[0]: 1.0}])


def test_a_step_without_a_row_form_makes_the_plan_slow_but_right(frame: pd.DataFrame) -> None:
    fitted = build_pipeline(NO_STEPS).fit(frame.iloc[:400], batch_ids=["b1"])
    sqrt = OnColumns(FunctionTransformer(np.sqrt, feature_names_out="one-to-one"), ["amount"])
    steps = [*fitted.pipeline.steps, ("9_sqrt", sqrt.fit(frame))]
    custom = dataclasses.replace(fitted, pipeline=Pipeline(steps))
    record = frame.drop(columns="isFraud").iloc[450].to_dict()

    assert not compile_online(custom).fast
    assert compile_online(custom).matrix([record]) is None
    matrix = online_matrix(custom, [record], ["amount"])
    assert matrix[0, 0] == pytest.approx(np.sqrt(record["amount"]), rel=1e-15)


def test_an_iterator_of_records_is_still_accepted(frame: pd.DataFrame) -> None:
    fitted = build_pipeline(EVERY_KIND).fit(frame.iloc[:400], batch_ids=["b1"])
    records = [frame.drop(columns="isFraud").iloc[i].to_dict() for i in (450, 460)]

    assert_frame_equal(fitted.transform_online(iter(records)), reference(fitted, records))
