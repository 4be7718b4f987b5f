"""Feature pipelines end to end: ids, fitting, online/offline parity, dill, joins, the YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dill
import numpy as np
import pandas as pd
import pytest
import yaml
from pandas.api.types import is_numeric_dtype
from pandas.testing import assert_frame_equal
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.datasets import paysim
from common.errors import InvalidInput
from preparation import (
    FittedFeatureSet,
    build_pipeline,
    feature_set_id,
    join_inputs,
    missing_inputs,
    parse_spec,
)
from tests.fixtures.pipeline import AGGREGATE_STEPS, AGGREGATES, paysim_accounts

FIXTURE = Path(__file__).parents[1] / "fixtures" / "pipeline.yaml"
CARRIED = ["nameOrig", "timestamp", "isFraud"]
PARITY_SPEC: dict[str, Any] = {
    "name": "parity", "inputs": ["transactions"], "entity_key": "nameOrig",
    "timestamp": "timestamp", "label": "isFraud",
    "steps": [
        *AGGREGATE_STEPS,
        {"kind": "difference", "params": {"a": ["newbalanceOrig", "amount"],
                                          "b": "oldbalanceOrg", "name": "errorBalanceOrig"}},
        {"kind": "ratio", "params": {"a": "amount", "b": "oldbalanceOrg", "name": "share"}},
        {"kind": "date_parts", "params": {"column": "timestamp", "parts": ["hour", "day"]}},
        {"kind": "log", "params": {"columns": ["amount"]}},
        {"kind": "one_hot", "params": {"columns": ["type"]}},
        {"kind": "drop", "params": {"columns": ["nameDest", "step"]}},
        {"kind": "select_k_best", "params": {"k": 16}},
    ],
}


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return paysim_accounts(400, seed=3, accounts=25)


@pytest.fixture(scope="module")
def fitted(frame: pd.DataFrame) -> FittedFeatureSet:
    return build_pipeline(PARITY_SPEC).fit(frame, batch_ids=["b2", "b1"])


def as_json_record(frame: pd.DataFrame, position: int) -> dict[str, Any]:
    """A raw row as a scoring request would carry it: no label, the time as a string."""
    record = frame.drop(columns=["isFraud"]).iloc[[position]].to_dict(orient="records")[0]
    return {**record, "timestamp": record["timestamp"].isoformat()}


def positions(frame: pd.DataFrame, offline: pd.DataFrame) -> list[int]:
    """Every 25th row that survives the offline filter, past the first few."""
    kept = [frame.index.get_loc(label) for label in offline.index]
    return kept[20::25]


def test_feature_set_id_is_pinned() -> None:
    spec = parse_spec({"name": "fraud", "inputs": ["transactions"], "entity_key": "nameOrig",
                       "label": "isFraud",
                       "steps": [{"kind": "one_hot", "params": {"columns": ["type"]}}]})

    assert feature_set_id(spec, ["b2", "b1"]) == "c6dd870a0f283ab9"


def test_feature_set_id_follows_the_spec_and_the_batches_not_their_order() -> None:
    spec = parse_spec(PARITY_SPEC)
    other = parse_spec({**PARITY_SPEC, "steps": PARITY_SPEC["steps"][:-1]})
    same = feature_set_id(spec, ["b1", "b2"])

    assert feature_set_id(spec, ["b2", "b1", "b2"]) == same
    assert feature_set_id(spec, ["b1", "b3"]) != same
    assert feature_set_id(spec, ["b1"]) != same
    assert feature_set_id(other, ["b1", "b2"]) != same
    assert feature_set_id(parse_spec({**PARITY_SPEC, "name": "x"}), ["b1", "b2"]) != same
    with pytest.raises(InvalidInput, match="not the string 'b1'"):
        feature_set_id(spec, "b1")


def test_fit_gives_a_versioned_feature_set(fitted: FittedFeatureSet) -> None:
    assert fitted.feature_set_id == feature_set_id(parse_spec(PARITY_SPEC), ["b1", "b2"])
    assert fitted.batch_ids == ("b1", "b2")
    assert (fitted.label, fitted.entity_key) == ("isFraud", "nameOrig")
    assert fitted.aggregate_columns == AGGREGATES
    assert len(fitted.feature_names) == 16
    assert not set(fitted.feature_names) & {*CARRIED, "nameDest", "type", "step"}
    assert set(AGGREGATES) & set(fitted.feature_names)  # parity below covers aggregates


def test_transform_gives_features_then_carried_columns(
        fitted: FittedFeatureSet, frame: pd.DataFrame) -> None:
    out = fitted.transform(frame)
    kept = frame[frame["type"] != "DEBIT"]

    assert list(out.columns) == [*fitted.feature_names, *CARRIED]
    assert out.index.equals(kept.index)
    assert_frame_equal(out[CARRIED], kept[CARRIED])
    assert all(is_numeric_dtype(out[c]) for c in fitted.feature_names)
    assert out["nameOrig_amount_count_48h"].abs().sum() > 0


def test_online_rows_one_at_a_time_with_history_equal_offline(
        fitted: FittedFeatureSet, frame: pd.DataFrame) -> None:
    offline = fitted.transform(frame)
    features = list(fitted.feature_names)

    for position in positions(frame, offline):
        online = fitted.transform_online([as_json_record(frame, position)],
                                         history=frame.iloc[:position])
        expected = offline.loc[[frame.index[position]], features]
        assert_frame_equal(online[features], expected.reset_index(drop=True),
                           check_exact=True)
        assert list(online.columns) == [*features, "nameOrig", "timestamp"]


def test_online_rows_with_aggregates_from_the_online_store_equal_offline(
        fitted: FittedFeatureSet, frame: pd.DataFrame) -> None:
    offline = fitted.transform(frame)
    features = list(fitted.feature_names)

    for position in positions(frame, offline):
        record = as_json_record(frame, position)
        store = fitted.latest_aggregates(frame.iloc[:position], at=record["timestamp"])
        if record["nameOrig"] in store.index:
            record |= store.loc[record["nameOrig"]].to_dict()
        online = fitted.transform_online([record])
        expected = offline.loc[[frame.index[position]], features].reset_index(drop=True)
        assert_frame_equal(online[features], expected, check_exact=True)


def test_latest_aggregates_are_per_entity_as_of_a_time(
        fitted: FittedFeatureSet, frame: pd.DataFrame) -> None:
    store = fitted.latest_aggregates(frame)
    account = frame[frame["nameOrig"] == "C3"]
    last_two = account["amount"].iloc[-2:].mean()

    assert sorted(store.index) == sorted(frame["nameOrig"].unique())
    assert list(store.columns) == AGGREGATES
    assert store.loc["C3", "nameOrig_amount_mean_last2"] == pytest.approx(last_two)
    later = fitted.latest_aggregates(frame, at=frame["timestamp"].max() + pd.Timedelta("49h"))
    assert (later["nameOrig_amount_count_48h"] == 0).all()


def test_online_rows_are_never_filtered(fitted: FittedFeatureSet, frame: pd.DataFrame) -> None:
    debits = frame[frame["type"] == "DEBIT"]
    assert len(debits) > 0

    online = fitted.transform_online(debits)

    assert online.index.equals(debits.index)
    offline = fitted.transform(debits)
    assert offline.empty
    assert list(offline.columns) == [*fitted.feature_names, *CARRIED]


def test_fitting_on_no_rows_names_the_step(frame: pd.DataFrame) -> None:
    with pytest.raises(InvalidInput, match=r"^steps\[5\] \(difference\): no rows left to fit"):
        build_pipeline(PARITY_SPEC).fit(frame[frame["type"] == "DEBIT"])


def test_online_without_history_means_no_past(fitted: FittedFeatureSet,
                                              frame: pd.DataFrame) -> None:
    record = as_json_record(frame, 200)
    alone = fitted.transform_online([record])
    brand_new = fitted.transform_online([{**record, "nameOrig": "C-new"}],
                                        history=frame.iloc[:200])

    assert_frame_equal(alone.drop(columns="nameOrig"), brand_new.drop(columns="nameOrig"))


def test_online_records_must_be_coercible(fitted: FittedFeatureSet,
                                          frame: pd.DataFrame) -> None:
    record = as_json_record(frame, 5)

    with pytest.raises(InvalidInput, match="column 'amount' holds values that are not numbers"):
        fitted.transform_online([{**record, "amount": "lots"}])
    with pytest.raises(InvalidInput, match="not timestamps"):
        fitted.transform_online([{**record, "timestamp": "yesterday"}])


def test_dill_round_trip_gives_identical_transforms(fitted: FittedFeatureSet,
                                                    frame: pd.DataFrame) -> None:
    loaded = dill.loads(dill.dumps(fitted))

    assert loaded.feature_set_id == fitted.feature_set_id
    assert loaded.feature_names == fitted.feature_names
    assert_frame_equal(loaded.transform(frame), fitted.transform(frame), check_exact=True)
    records = [as_json_record(frame, 300), as_json_record(frame, 301)]
    assert_frame_equal(loaded.transform_online(records, history=frame.iloc[:300]),
                       fitted.transform_online(records, history=frame.iloc[:300]))


def test_each_fit_is_independent(frame: pd.DataFrame) -> None:
    pipeline = build_pipeline(PARITY_SPEC)

    first = pipeline.fit(frame.iloc[:200], ["b1"])
    second = pipeline.fit(frame, ["b1", "b2"])

    assert first.pipeline is not second.pipeline
    assert first.feature_set_id != second.feature_set_id
    scaler = first.pipeline.steps[3][1].estimator_
    assert scaler.n_samples_seen_ == 200


def test_fit_errors_name_the_step(frame: pd.DataFrame) -> None:
    spec = {**PARITY_SPEC, "steps": [
        {"kind": "drop", "params": {"columns": ["step"]}},
        {"kind": "ratio", "params": {"a": "amount", "b": "nope", "name": "r"}},
    ]}

    with pytest.raises(InvalidInput, match=r"^steps\[1\] \(ratio\): missing columns \['nope'\]$"):
        build_pipeline(spec).fit(frame)


def test_features_left_as_text_fail_at_fit(frame: pd.DataFrame) -> None:
    spec = {**PARITY_SPEC, "steps": [{"kind": "one_hot", "params": {"columns": ["type"]}}]}

    with pytest.raises(InvalidInput, match=r"columns \['nameDest'\] are not numeric"):
        build_pipeline(spec).fit(frame)


def test_an_empty_spec_passes_numeric_columns_through(frame: pd.DataFrame) -> None:
    spec = {**PARITY_SPEC, "steps": []}
    numeric = frame.drop(columns=["type", "nameDest"])

    out = build_pipeline(spec).fit(numeric).transform(numeric)

    assert list(out.columns) == [*numeric.columns.drop(CARRIED), *CARRIED]


def test_a_duplicated_index_is_refused(frame: pd.DataFrame) -> None:
    with pytest.raises(InvalidInput, match="index has duplicates"):
        build_pipeline(PARITY_SPEC).fit(pd.concat([frame, frame]))


def test_missing_inputs_and_joins() -> None:
    spec = parse_spec({"name": "j", "inputs": ["tx", "accounts", "risk"],
                       "join": {"on": ["account"], "how": "left"}})
    tx = pd.DataFrame({"account": ["a", "b", "a"], "amount": [1.0, 2.0, 3.0]})
    accounts = pd.DataFrame({"account": ["a", "b"], "age": [5, 7], "amount": [0.0, 0.0]})
    risk = pd.DataFrame({"account": ["a"], "score": [0.9]})

    assert missing_inputs(spec, {"tx"}) == ["accounts", "risk"]
    assert missing_inputs(spec, {"risk", "tx", "accounts", "other"}) == []
    with pytest.raises(InvalidInput, match=r"inputs not available: \['risk'\]"):
        join_inputs({"tx": tx, "accounts": accounts}, spec)
    joined = join_inputs({"tx": tx, "accounts": accounts, "risk": risk}, spec)
    assert_frame_equal(joined, pd.DataFrame({
        "account": ["a", "b", "a"], "amount": [1.0, 2.0, 3.0], "age": [5, 7, 5],
        "amount_accounts": [0.0, 0.0, 0.0], "score": [0.9, np.nan, 0.9],
    }))


def test_join_keys_must_exist() -> None:
    spec = parse_spec({"name": "j", "inputs": ["tx", "accounts"], "join": {"on": ["account"]}})

    with pytest.raises(InvalidInput, match=r"input accounts lack the join keys \['account'\]"):
        join_inputs({"tx": pd.DataFrame({"account": [1]}), "accounts": pd.DataFrame({"x": [1]})},
                    spec)


def test_a_single_input_is_the_frame() -> None:
    spec = parse_spec({"name": "one", "inputs": ["tx"]})
    tx = pd.DataFrame({"a": [1]})

    assert join_inputs({"tx": tx}, spec) is tx


def test_the_example_yaml_learns_paysim_fraud() -> None:
    spec = parse_spec(yaml.safe_load(FIXTURE.read_text())["features"])
    fitted = build_pipeline(spec).fit(paysim(5000, seed=1), batch_ids=["train"])
    train, test = fitted.transform(paysim(5000, seed=1)), fitted.transform(paysim(5000, seed=2))
    features = list(fitted.feature_names)

    def average_precision(model: Any) -> float:
        model.fit(train[features], train[fitted.label])
        return average_precision_score(test[fitted.label],
                                       model.predict_proba(test[features])[:, 1])

    learned = average_precision(make_pipeline(StandardScaler(), LogisticRegression()))
    chance = average_precision(DummyClassifier(strategy="prior"))
    assert len(features) == 12
    assert learned > 0.5  # about 0.73 on these seeds
    assert learned > 20 * chance  # chance is the fraud rate, about 0.01


def _filter_first(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with its filter first: offline rows differ from online ones at the aggregates."""
    filters = [s for s in spec["steps"] if s["kind"] == "filter"]
    return {**spec, "steps": [*filters, *(s for s in spec["steps"] if s["kind"] != "filter")]}


def _gappy(frame: pd.DataFrame) -> pd.DataFrame:
    """Some rows without an entity, a time or an amount, and an index that is not 0..n."""
    gappy = frame.copy()
    gappy.loc[gappy.index[::17], "nameOrig"] = None
    gappy.loc[gappy.index[5::23], "timestamp"] = pd.NaT
    gappy.loc[gappy.index[3::11], "amount"] = np.nan
    return gappy.set_axis(gappy.index * 3 + 7)


@pytest.mark.filterwarnings("ignore::preparation.pipeline.SkewWarning")
@pytest.mark.parametrize("spec", [PARITY_SPEC, _filter_first(PARITY_SPEC)],
                         ids=["one-run", "filter-first"])
def test_transform_and_latest_equals_transform_and_latest_aggregates(
        spec: dict[str, Any], frame: pd.DataFrame) -> None:
    for data in (frame, _gappy(frame)):
        fitted = build_pipeline(spec).fit(data.dropna(), batch_ids=["b1"])

        features, latest = fitted.transform_and_latest(data)

        assert_frame_equal(features, fitted.transform(data), check_exact=True)
        assert_frame_equal(latest, fitted.latest_aggregates(data), check_exact=True)


def test_transform_and_latest_without_a_timestamp_counts_rows_in_order() -> None:
    data = pd.DataFrame({"k": ["a", "b", "a", "a", None], "x": [1.0, 2.0, np.nan, 4.0, 5.0],
                         "y": [0, 1, 0, 1, 0]})
    spec = {"name": "rows", "inputs": ["t"], "entity_key": "k", "label": "y", "steps": [
        {"kind": "entity_aggregate", "params": {"column": "x", "window": 2}}]}
    fitted = build_pipeline(spec).fit(data, batch_ids=["b1"])

    features, latest = fitted.transform_and_latest(data)

    assert_frame_equal(features, fitted.transform(data), check_exact=True)
    assert_frame_equal(latest, fitted.latest_aggregates(data), check_exact=True)
    assert latest.loc["a", "k_x_sum_last2"] == 4.0  # the last two rows of a: NaN (skipped), 4
