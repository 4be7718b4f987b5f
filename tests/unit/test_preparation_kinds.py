"""Each registered step kind on a small frame, with exact expected values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal, assert_series_equal
from sklearn.exceptions import NotFittedError

from common.errors import InvalidInput
from preparation import known_kinds
from preparation.registry import StepContext, build_step

CONTEXT = StepContext(entity_key="id", timestamp="when", label="label")
MINIMAL: dict[str, dict[str, Any]] = {
    "impute": {"columns": ["x"]},
    "one_hot": {"columns": ["kind"]},
    "scale": {"columns": ["y"]},
    "log": {"columns": ["y"]},
    "ratio": {"a": "x", "b": "y", "name": "r"},
    "difference": {"a": "x", "b": "y", "name": "d"},
    "date_parts": {"column": "when"},
    "entity_aggregate": {"column": "y", "window": 2},
    "select_k_best": {"k": 1},
    "filter": {"query": "y > 0"},
    "drop": {"columns": ["x"]},
}


def small() -> pd.DataFrame:
    return pd.DataFrame({
        "id": ["a", "b", "a", "c"],
        "kind": ["X", "Y", "X", "Z"],
        "x": [1.0, np.nan, 3.0, 8.0],
        "y": [2.0, 0.0, 4.0, 1.0],
        "when": pd.to_datetime(["2026-01-03T05:00Z", "2026-01-03T06:00Z",
                                "2026-02-01T23:00Z", "2026-03-15T00:30Z"]),
        "label": [0, 1, 0, 1],
    }, index=[10, 11, 12, 13])


def step(kind: str, **params: Any) -> Any:
    return build_step(0, kind, params, CONTEXT)


def fitted(kind: str, **params: Any) -> pd.DataFrame:
    return step(kind, **params).fit_transform(small())


def test_every_kind_has_a_case_here() -> None:
    assert sorted(MINIMAL) == known_kinds()


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_every_kind_refuses_to_transform_before_fit(kind: str) -> None:
    with pytest.raises(NotFittedError):
        step(kind, **MINIMAL[kind]).transform(small())


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_every_kind_keeps_the_index_and_passes_unknown_columns(kind: str) -> None:
    frame = small().drop(columns=["kind", "x"]) if kind == "select_k_best" else small()
    transformer = step(kind, **MINIMAL[kind]).fit(frame)

    out = transformer.transform_online(frame.assign(unseen=[1, 2, 3, 4]))

    assert list(out.index) == [10, 11, 12, 13]  # online never drops rows, even for filter
    assert list(out["unseen"]) == [1, 2, 3, 4]


def test_impute_fills_with_the_fitted_mean_and_passes_other_columns() -> None:
    transformer = step("impute", columns=["x"]).fit(small())

    out = transformer.transform(pd.DataFrame({"x": [np.nan], "z": ["kept"]}, index=[7]))

    assert_frame_equal(out, pd.DataFrame({"z": ["kept"], "x": [4.0]}, index=[7]),
                       check_like=True)


def test_impute_with_a_constant() -> None:
    assert list(fitted("impute", columns=["x"], strategy="constant", fill_value=-1)["x"]) == [
        1.0, -1.0, 3.0, 8.0]


def test_one_hot_replaces_the_column_and_ignores_unknown_categories() -> None:
    transformer = step("one_hot", columns=["kind"]).fit(small())

    out = transformer.transform(pd.DataFrame({"kind": ["Y", "W"]}))

    assert_frame_equal(out, pd.DataFrame({"kind_X": [0.0, 0.0], "kind_Y": [1.0, 0.0],
                                          "kind_Z": [0.0, 0.0]}))


def test_scale_standard_and_minmax() -> None:
    standard = fitted("scale", columns=["y"])["y"]
    minmax = fitted("scale", columns=["y"], method="minmax")["y"]

    spread = np.sqrt(2.1875)  # population std of [2, 0, 4, 1] around 1.75
    np.testing.assert_allclose(standard, (np.array([2, 0, 4, 1]) - 1.75) / spread)
    assert list(minmax) == [0.5, 0.0, 1.0, 0.25]


def test_log_is_log1p_in_place_and_refuses_negatives() -> None:
    out = fitted("log", columns=["y"])

    np.testing.assert_allclose(out["y"], np.log1p([2.0, 0.0, 4.0, 1.0]))
    assert list(out.columns[:2]) == ["id", "kind"]
    with pytest.raises(InvalidInput, match=r"columns \['y'\] have negatives"):
        step("log", columns=["y"]).fit_transform(small().assign(y=[1.0, -1.0, 0.0, 2.0]))


def test_log_refuses_text() -> None:
    with pytest.raises(InvalidInput, match=r"columns \['kind'\] are not numeric"):
        step("log", columns=["kind"]).fit_transform(small())


def test_ratio_divides_safely() -> None:
    out = fitted("ratio", a="x", b="y", name="r")
    filled = fitted("ratio", a="y", b="y", name="r", fill=-1.0)

    assert_series_equal(out["r"], pd.Series([0.5, np.nan, 0.75, 8.0], index=out.index,
                                            name="r"))
    assert list(filled["r"]) == [1.0, -1.0, 1.0, 1.0]


def test_difference_sums_each_side() -> None:
    out = fitted("difference", a=["x", "y"], b="y", name="d")
    simple = fitted("difference", a="y", b="x", name="d")

    assert out["d"].tolist()[::2] == [1.0, 3.0]
    assert np.isnan(out["d"].iloc[1])  # a missing value is never read as 0
    assert simple["d"].tolist()[::2] == [1.0, 1.0]


def test_date_parts_in_utc_then_drops_the_column() -> None:
    out = fitted("date_parts", column="when", parts=["hour", "dayofweek", "month",
                                                     "is_weekend"])

    assert "when" not in out.columns
    assert out["when_hour"].tolist() == [5, 6, 23, 0]
    assert out["when_dayofweek"].tolist() == [5, 5, 6, 6]  # Sat, Sat, Sun, Sun
    assert out["when_month"].tolist() == [1, 1, 2, 3]
    assert out["when_is_weekend"].tolist() == [1, 1, 1, 1]


def test_date_parts_keep_and_iso_strings_with_offsets() -> None:
    transformer = step("date_parts", column="when", parts=["hour"], keep=True).fit(small())

    out = transformer.transform(pd.DataFrame({"when": ["2026-01-03T07:00:00+02:00"]}))

    assert out["when_hour"].tolist() == [5]
    assert out["when"].tolist() == ["2026-01-03T07:00:00+02:00"]
    with pytest.raises(InvalidInput, match="not timestamps"):
        transformer.transform(pd.DataFrame({"when": ["soon"]}))


def test_select_k_best_keeps_the_informative_column_and_carried_ones() -> None:
    rng = np.random.default_rng(0)
    label = np.tile([0, 1], 30)
    frame = pd.DataFrame({
        "id": "a", "noise": rng.normal(size=60), "signal": label * 3 + rng.random(60),
        "negative": rng.normal(-5, 1, size=60), "when": pd.Timestamp("2026-01-01"),
        "label": label,
    })

    for score_func in ("chi2", "mutual_info"):
        out = step("select_k_best", k=1, score_func=score_func).fit_transform(frame)
        assert list(out.columns) == ["id", "signal", "when", "label"], score_func


def test_select_k_best_refuses_text_and_missing_values() -> None:
    with pytest.raises(InvalidInput, match=r"columns \['kind'\] are not numeric"):
        step("select_k_best", k=1).fit(small())
    with pytest.raises(InvalidInput, match=r"columns \['x'\] have missing or infinite"):
        step("select_k_best", k=1).fit(small().drop(columns=["kind"]))


def test_select_k_best_online_needs_no_label() -> None:
    frame = small().drop(columns=["kind", "x"]).assign(flat=1.0)
    transformer = step("select_k_best", k=1).fit(frame)

    out = transformer.transform(frame.drop(columns=["label"]))

    assert transformer.selected_ == ["y"]
    assert list(out.columns) == ["id", "y", "when"]


def test_filter_by_query_and_by_conditions() -> None:
    by_query = fitted("filter", query="y > 0 and kind != 'Z'")
    by_where = fitted("filter", where={"kind": {"in": ["X", "Z"]}, "y": {">=": 2}})
    negated = fitted("filter", where={"kind": {"not in": ["X"]}})

    assert list(by_query.index) == [10, 12]
    assert list(by_where.index) == [10, 12]
    assert list(negated.index) == [11, 13]


def test_filter_errors_are_input_errors() -> None:
    with pytest.raises(InvalidInput, match="cannot evaluate query"):
        step("filter", query="nope > 1").fit_transform(small())
    with pytest.raises(InvalidInput, match="does not give one boolean per row"):
        step("filter", query="y + 1").fit_transform(small())
    with pytest.raises(InvalidInput, match=r"missing columns \['nope'\]"):
        step("filter", where={"nope": {"==": 1}}).fit(small())


def test_drop_removes_columns_and_a_typo_fails_at_fit() -> None:
    assert list(fitted("drop", columns=["x", "kind"]).columns) == ["id", "y", "when", "label"]
    with pytest.raises(InvalidInput, match=r"missing columns \['nope'\]"):
        step("drop", columns=["nope"]).fit(small())


def test_missing_columns_are_named_at_fit() -> None:
    with pytest.raises(InvalidInput, match=r"missing columns \['nope'\]"):
        step("ratio", a="x", b="nope", name="r").fit(small())
