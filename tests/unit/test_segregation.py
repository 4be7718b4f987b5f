"""The split API: strategies, determinism, complementary parts, labels, warnings, config."""

from __future__ import annotations

import importlib
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from common.errors import InvalidInput
from segregation import Split, SplitConfig, SplitWarning, split

# Most splits here are deliberately small or uneven; tests that care catch the warnings.
pytestmark = pytest.mark.filterwarnings("ignore::segregation.SplitWarning")

CUSTOM_MODULE = '''
import numpy as np

CALLS = []
NOT_CALLABLE = 42


def every_fifth(frame, ratio, seed):
    CALLS.append((len(frame), ratio, seed))
    positions = np.arange(len(frame))
    return positions[positions % 5 != 0], positions[positions % 5 == 0]
'''


def frame(rows: int = 200, label: list | None = None) -> pd.DataFrame:
    """A frame with a non-default index, so positions and labels cannot be confused."""
    labels = label if label is not None else [i % 2 for i in range(rows)]
    return pd.DataFrame(
        {"x": np.arange(rows, dtype=float), "y": labels}, index=[f"r{i}" for i in range(rows)]
    )


def same_rows(a: Split, b: Split) -> bool:
    return a.train.index.equals(b.train.index) and a.test.index.equals(b.test.index)


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "custom_strategies.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "custom_strategies", raising=False)
    return "custom_strategies"


# --- determinism and complementary parts ------------------------------------------------


@pytest.mark.parametrize("strategy", ["random", "sequential"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_same_inputs_give_the_same_rows(strategy, shuffle):
    first = split(frame(), strategy, ratio=0.7, seed=3, shuffle=shuffle)
    second = split(frame(), strategy, ratio=0.7, seed=3, shuffle=shuffle)
    assert same_rows(first, second)


@pytest.mark.parametrize("strategy", ["random", "sequential"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_train_and_test_are_disjoint_and_cover_every_row(strategy, shuffle):
    data = frame()
    parts = split(data, strategy, ratio=0.7, seed=3, shuffle=shuffle)
    assert parts.train.index.intersection(parts.test.index).empty
    assert sorted(parts.train.index.append(parts.test.index)) == sorted(data.index)
    assert (len(parts.train), len(parts.test)) == (140, 60)


def test_training_and_evaluation_calls_get_complementary_parts():
    data = frame()
    for_training = split(data, "random", ratio=0.8, seed=11, label="y").X_train
    for_evaluation = split(data, "random", ratio=0.8, seed=11, label="y").X_test
    assert for_training.index.intersection(for_evaluation.index).empty
    assert len(for_training) + len(for_evaluation) == len(data)


def test_a_different_seed_picks_different_rows():
    assert not same_rows(split(frame(), seed=1), split(frame(), seed=2))


def test_rows_keep_their_values():
    parts = split(frame(), seed=5)
    assert (parts.train["x"] == [float(i[1:]) for i in parts.train.index]).all()


# --- strategies -------------------------------------------------------------------------


def test_sequential_takes_the_first_rows_in_order():
    parts = split(frame(100), "sequential", ratio=0.7)
    assert list(parts.train.index) == [f"r{i}" for i in range(70)]
    assert list(parts.test.index) == [f"r{i}" for i in range(70, 100)]


def test_random_picks_rows_from_everywhere_and_keeps_frame_order_within_parts():
    parts = split(frame(100), "random", ratio=0.7, seed=0)
    assert list(parts.train.index) != [f"r{i}" for i in range(70)]
    assert parts.train["x"].is_monotonic_increasing
    assert parts.test["x"].is_monotonic_increasing


@pytest.mark.parametrize("strategy", ["random", "sequential"])
def test_shuffling_reorders_rows_within_each_part_only(strategy):
    plain = split(frame(), strategy, seed=4)
    shuffled = split(frame(), strategy, seed=4, shuffle=True)
    assert set(shuffled.train.index) == set(plain.train.index)
    assert set(shuffled.test.index) == set(plain.test.index)
    assert not shuffled.train["x"].is_monotonic_increasing
    assert not shuffled.test["x"].is_monotonic_increasing


def test_ratio_rounds_to_the_nearest_row():
    assert len(split(frame(100), "sequential", ratio=0.29).train) == 29
    assert len(split(frame(3), "sequential", ratio=0.5).train) == 2


def test_an_injected_callable_decides_the_parts():
    def last_quarter(data, ratio, seed):
        cut = int(len(data) * 0.75)
        return np.arange(cut), np.arange(cut, len(data))

    parts = split(frame(100), last_quarter)
    assert list(parts.test.index) == [f"r{i}" for i in range(75, 100)]


@pytest.mark.parametrize("separator", [":", "."])
def test_a_dotted_path_strategy_is_imported_and_given_ratio_and_seed(custom_module, separator):
    parts = split(frame(100), f"{custom_module}{separator}every_fifth", ratio=0.6, seed=9)
    assert list(parts.test.index) == [f"r{i}" for i in range(0, 100, 5)]
    assert importlib.import_module(custom_module).CALLS == [(100, 0.6, 9)]


def test_a_custom_strategy_may_leave_a_gap_between_the_parts():
    parts = split(frame(100), lambda data, ratio, seed: (np.arange(60), np.arange(70, 100)))
    assert (len(parts.train), len(parts.test)) == (60, 30)


def test_a_path_that_cannot_be_imported_is_named_in_the_error():
    with pytest.raises(InvalidInput, match=r"'no_such_module_xyz:split' cannot be imported"):
        split(frame(), "no_such_module_xyz:split")


def test_a_missing_function_in_a_module_is_named_in_the_error(custom_module):
    with pytest.raises(InvalidInput, match=r"'custom_strategies:nowhere' cannot be imported"):
        split(frame(), f"{custom_module}:nowhere")


def test_a_path_to_something_not_callable_is_refused(custom_module):
    with pytest.raises(InvalidInput, match=r"'custom_strategies:NOT_CALLABLE' is not callable"):
        split(frame(), f"{custom_module}:NOT_CALLABLE")


def test_an_unknown_strategy_name_lists_the_known_ones():
    with pytest.raises(InvalidInput, match=r"unknown split strategy 'randm'.*random, sequential"):
        split(frame(), "randm")


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ((np.arange(0, 120), np.arange(100, 200)), "put 20 row\\(s\\) in both train and test"),
        ((np.arange(0, 100), np.arange(100, 201)), "bad test positions: positions must lie in"),
        ((np.arange(0, 100), np.array([], dtype=int)), "bad test positions: the part is empty"),
        ((np.arange(0, 100) * 1.0, np.arange(100, 200)), "bad train positions: expected integer"),
        ((np.array([1, 1, 2]), np.arange(100, 200)), "a row appears more than once"),
        (np.arange(200), "must return \\(train_positions, test_positions\\)"),
    ],
)
def test_a_bad_custom_answer_is_refused_with_the_problem(answer, problem):
    with pytest.raises(InvalidInput, match=problem):
        split(frame(), lambda data, ratio, seed: answer)


# --- arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2, float("nan"), True, "0.8"])
def test_a_ratio_outside_zero_and_one_is_refused(ratio):
    with pytest.raises(InvalidInput, match="ratio must be strictly between 0 and 1"):
        split(frame(), ratio=ratio)


def test_a_ratio_leaving_a_part_empty_is_refused():
    with pytest.raises(InvalidInput, match="ratio 0.99 of 10 rows leaves the test part empty"):
        split(frame(10), ratio=0.99)


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_a_bad_seed_is_refused(seed):
    with pytest.raises(InvalidInput, match="seed must be a non-negative integer"):
        split(frame(), seed=seed)


def test_too_few_rows_are_refused():
    with pytest.raises(InvalidInput, match="cannot split 1 row"):
        split(frame(1))


# --- labels -----------------------------------------------------------------------------


def test_with_a_label_features_and_labels_come_apart():
    parts = split(frame(), label="y")
    assert list(parts.X_train.columns) == ["x"] and list(parts.X_test.columns) == ["x"]
    assert parts.y_train.name == "y" and parts.y_test.name == "y"
    assert parts.X_train.index.equals(parts.y_train.index)
    assert parts.X_test.index.equals(parts.test.index)
    assert "y" in parts.train.columns


@pytest.mark.parametrize("kwargs", [{}, {"label": "y", "with_labels": False}])
def test_without_labels_there_are_no_x_y_parts(kwargs):
    parts = split(frame(), **kwargs)
    assert parts.label is None and "y" in parts.train.columns
    with pytest.raises(InvalidInput, match="this split has no label"):
        _ = parts.X_train


def test_an_unknown_label_column_is_named():
    with pytest.raises(InvalidInput, match="label 'target' is not a column"):
        split(frame(), label="target")


# --- warnings ---------------------------------------------------------------------------


def kinds(parts: Split) -> list[str]:
    return [warning.kind for warning in parts.warnings]


def test_a_class_missing_from_train_is_warned_with_its_counts():
    data = frame(200, label=[0] * 180 + [1] * 20)
    with pytest.warns(SplitWarning, match="class 1 has 20 rows in test and none in train"):
        parts = split(data, "sequential", ratio=0.8, label="y")
    assert kinds(parts) == ["missing_class"]


def test_a_class_missing_from_test_is_warned():
    parts = split(frame(200, label=["fraud"] * 20 + ["ok"] * 180), "sequential", label="y")
    expected = "class 'fraud' has 20 rows in train and none in test"
    assert [str(warning) for warning in parts.warnings] == [expected]


def rare_in_test(data, ratio, seed):
    return np.arange(160), np.arange(160, 200)


RARE = [1] * 16 + [0] * 144 + [1] * 1 + [0] * 39  # 10 % of train, 2.5 % of test


def test_a_class_far_rarer_in_one_part_is_warned_with_both_shares():
    with pytest.warns(SplitWarning) as caught:
        parts = split(frame(200, label=RARE), rare_in_test, label="y")
    assert kinds(parts) == ["rare_class"]
    assert str(caught[0].message) == (
        "class 1 is 4.0x rarer in test (2.50%, 1 of 40 rows) than in train "
        "(10.00%, 16 of 160 rows), beyond the allowed factor 2"
    )


def test_the_imbalance_factor_is_configurable():
    assert kinds(split(frame(200, label=RARE), rare_in_test, label="y", imbalance_factor=5)) == []


def test_class_checks_skip_a_continuous_label():
    data = frame(200, label=list(np.linspace(0, 1, 200)))
    assert kinds(split(data, "sequential", label="y")) == []


def test_class_checks_skip_an_unlabelled_split():
    assert kinds(split(frame(200, label=[0] * 180 + [1] * 20), "sequential")) == []


def test_a_small_part_is_warned_with_its_size():
    with pytest.warns(SplitWarning, match="test part has 20 rows, below the minimum of 30"):
        parts = split(frame(100), label="y")
    assert kinds(parts) == ["small_part"]


def test_the_minimum_part_size_is_configurable():
    assert kinds(split(frame(100), label="y", min_part_rows=20)) == []
    assert kinds(split(frame(100), label="y", min_part_rows=90)) == ["small_part", "small_part"]


@pytest.mark.parametrize("ratio", [0.3, 0.97])
def test_an_extreme_ratio_is_warned(ratio):
    with pytest.warns(SplitWarning, match=f"ratio {ratio} is extreme"):
        parts = split(frame(2000), ratio=ratio, label="y")
    assert kinds(parts) == ["extreme_ratio"]


def test_a_balanced_split_warns_nothing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts = split(frame(1000), "sequential", ratio=0.8, label="y")
    assert parts.warnings == []
    assert [w for w in caught if issubclass(w.category, SplitWarning)] == []


def test_warnings_point_at_the_caller():
    with pytest.warns(SplitWarning) as caught:
        split(frame(100))
    assert caught[0].filename == __file__


# --- config -----------------------------------------------------------------------------


def test_a_config_applies_the_same_split_as_the_call():
    config = SplitConfig.model_validate({"strategy": "sequential", "ratio": 0.6, "shuffle": True})
    by_config = config.apply(frame(), label="y")
    by_call = split(frame(), "sequential", ratio=0.6, seed=0, shuffle=True, label="y")
    assert same_rows(by_config, by_call)
    assert list(by_config.X_train.columns) == ["x"]


def test_a_config_passes_its_warning_thresholds():
    config = SplitConfig(min_part_rows=5, imbalance_factor=5)
    assert kinds(config.apply(frame(200, label=RARE), label="y")) == []
    assert kinds(SplitConfig(min_part_rows=50).apply(frame(200))) == ["small_part"]


def test_a_config_without_label_gives_an_unlabelled_split():
    assert SplitConfig().apply(frame()).label is None


def test_a_misspelt_config_key_is_named():
    with pytest.raises(ValidationError, match="ratoi\n  Extra inputs are not permitted"):
        SplitConfig.model_validate({"ratoi": 0.7})


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"ratio": 1.0}, "ratio\n  Input should be less than 1"),
        ({"strategy": "no_such_module_xyz:f"}, "strategy\n  Value error, custom split strategy"),
        ({"strategy": "randm"}, "unknown split strategy 'randm'"),
        ({"seed": -1}, "seed\n  Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_config_value_is_named(data, problem):
    with pytest.raises(ValidationError, match=problem):
        SplitConfig.model_validate(data)


def test_a_sequential_split_slices_the_frame_without_copying_it():
    frame = pd.DataFrame({"x": np.arange(100.0), "y": np.arange(100) % 2})
    parts = split(frame, "sequential", 0.8, with_labels=False)
    shuffled = split(frame, "sequential", 0.8, shuffle=True, with_labels=False)

    assert np.shares_memory(parts.train["x"].to_numpy(), frame["x"].to_numpy())
    assert np.shares_memory(parts.test["x"].to_numpy(), frame["x"].to_numpy())
    pd.testing.assert_frame_equal(parts.train, frame.iloc[:80])
    assert not np.shares_memory(shuffled.train["x"].to_numpy(), frame["x"].to_numpy())
    assert sorted(shuffled.train["x"]) == list(frame["x"].iloc[:80])
