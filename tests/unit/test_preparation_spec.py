"""Feature specs and the step registry: errors name the bad key, step, kind and param."""

from __future__ import annotations

import warnings

import pytest
import yaml
from sklearn.preprocessing import FunctionTransformer

from common.errors import InvalidInput
from preparation import SkewWarning, build_pipeline, known_kinds, parse_spec, register
from preparation import registry as registry_module
from preparation.spec import FeatureSpec
from preparation.transformers import OnColumns

KINDS = ["date_parts", "difference", "drop", "entity_aggregate", "filter", "impute", "log",
         "one_hot", "ratio", "scale", "select_k_best"]


def spec_with(*steps: dict, **fields: object) -> dict:
    base = {"name": "s", "inputs": ["tx"], "entity_key": "id", "timestamp": "when",
            "label": "label", "steps": list(steps)}
    return {**base, **fields}


def build_error(*steps: dict, **fields: object) -> str:
    with pytest.raises(InvalidInput) as caught:
        build_pipeline(spec_with(*steps, **fields))
    return str(caught.value)


def test_a_valid_spec_parses_with_defaults() -> None:
    spec = parse_spec(spec_with({"kind": "drop", "params": {"columns": ["x"]}}))

    assert isinstance(spec, FeatureSpec)
    assert spec.join is None
    assert spec.steps[0].kind == "drop"
    assert parse_spec(spec) is spec


def test_a_typo_at_the_top_level_names_the_key() -> None:
    data = spec_with()
    data["lable"] = data.pop("label")

    with pytest.raises(InvalidInput, match=r"'lable': Extra inputs are not permitted"):
        parse_spec(data)


def test_a_typo_inside_a_step_names_the_step_and_key() -> None:
    data = spec_with({"kind": "drop", "params": {"columns": ["x"]}},
                     {"kind": "drop", "parmas": {"columns": ["y"]}})

    with pytest.raises(InvalidInput, match=r"'steps\[1\]\.parmas': Extra inputs"):
        parse_spec(data)


def test_several_inputs_need_a_join() -> None:
    with pytest.raises(InvalidInput, match="2 inputs need a join"):
        parse_spec(spec_with(inputs=["tx", "accounts"]))


def test_entity_key_and_label_must_differ() -> None:
    with pytest.raises(InvalidInput, match="must be different columns"):
        parse_spec(spec_with(label="id"))


def test_a_bare_yaml_on_key_is_read_as_the_join_keys() -> None:
    data = yaml.safe_load("join: {on: [id], how: left}")
    assert True in data["join"]  # what PyYAML does with a bare `on`

    spec = parse_spec(spec_with(inputs=["tx", "accounts"], join=data["join"]))

    assert spec.join is not None
    assert (spec.join.on, spec.join.how) == (["id"], "left")


def test_the_registry_holds_every_required_kind() -> None:
    assert known_kinds() == KINDS


def test_an_unknown_kind_names_the_step_and_lists_known_kinds() -> None:
    message = build_error({"kind": "drop", "params": {"columns": ["x"]}},
                          {"kind": "one_hott", "params": {}})

    assert message.startswith("steps[1] (one_hott): unknown kind; known kinds: ")
    assert all(kind in message for kind in KINDS)


def test_an_unknown_param_names_step_kind_param_and_known_params() -> None:
    message = build_error({"kind": "one_hot", "params": {"colums": ["type"]}})

    assert message == (
        "steps[0] (one_hot): param 'columns': Field required; "
        "param 'colums': Extra inputs are not permitted (known params: columns)"
    )


@pytest.mark.parametrize(("step", "expected"), [
    ({"kind": "scale", "params": {"columns": ["x"], "method": "robust"}},
     r"steps\[0\] \(scale\): param 'method'"),
    ({"kind": "ratio", "params": {"a": "x", "b": "y"}},
     r"steps\[0\] \(ratio\): param 'name': Field required"),
    ({"kind": "entity_aggregate", "params": {"column": "x", "window": "5"}},
     r"steps\[0\] \(entity_aggregate\): param 'window'.*not a positive duration"),
    ({"kind": "entity_aggregate", "params": {"column": "x", "window": 0}},
     r"steps\[0\] \(entity_aggregate\): param 'window': Input should be greater than 0 "
     r"\(got 0\); param 'window': Input should be a valid string \(got 0\)"),
    ({"kind": "entity_aggregate", "params": {"column": "x", "window": 3, "stats": ["max"]}},
     r"steps\[0\] \(entity_aggregate\): param 'stats': Input should be 'count', 'sum' or "
     r"'mean' \(got 'max'\)"),
    ({"kind": "date_parts", "params": {"column": "when", "parts": ["hour", "hour"]}},
     r"steps\[0\] \(date_parts\): param 'parts'.*repeats"),
    ({"kind": "select_k_best", "params": {"k": 0}}, r"steps\[0\] \(select_k_best\): param 'k'"),
    ({"kind": "filter", "params": {"where": {"x": {"~": 1}}}},
     r"steps\[0\] \(filter\): param 'where': Input should be '==', .* \(got '~'\)"),
    ({"kind": "filter", "params": {}}, r"steps\[0\] \(filter\): param 'query' or 'where'"),
    ({"kind": "filter", "params": {"query": "x > 1", "where": {"x": {">": 1}}}},
     r"give exactly one"),
    ({"kind": "impute", "params": {"columns": []}}, r"param 'columns'"),
])
def test_bad_params_name_the_step_kind_and_param(step: dict, expected: str) -> None:
    with pytest.raises(InvalidInput, match=expected):
        build_pipeline(spec_with(step))


def test_a_time_window_needs_the_spec_timestamp() -> None:
    message = build_error({"kind": "entity_aggregate", "params": {"column": "x", "window": "1h"}},
                          timestamp=None)

    assert message.startswith("steps[0] (entity_aggregate): param 'window': '1h' is a time window")


def test_entity_aggregate_needs_the_spec_entity_key() -> None:
    message = build_error({"kind": "entity_aggregate", "params": {"column": "x", "window": 3}},
                          entity_key=None)

    assert message == "steps[0] (entity_aggregate): needs the spec's entity_key"


def test_select_k_best_needs_the_spec_label() -> None:
    message = build_error({"kind": "select_k_best", "params": {"k": 2}}, label=None)

    assert message == "steps[0] (select_k_best): needs the spec's label to score features"


@pytest.mark.parametrize(("step", "expected"), [
    ({"kind": "one_hot", "params": {"columns": ["type", "label"]}},
     "steps[0] (one_hot): param 'columns' names 'label', the spec's label: never a feature"),
    ({"kind": "scale", "params": {"columns": ["id"]}},
     "steps[0] (scale): param 'columns' names 'id', the spec's entity key: never a feature"),
    ({"kind": "ratio", "params": {"a": "x", "b": "y", "name": "label"}},
     "steps[0] (ratio): param 'name' names 'label', the spec's label: never a feature"),
    ({"kind": "difference", "params": {"a": ["x", "label"], "b": "y", "name": "d"}},
     "steps[0] (difference): param 'a' names 'label', the spec's label: never a feature"),
    ({"kind": "entity_aggregate", "params": {"column": "label", "window": 3}},
     "steps[0] (entity_aggregate): param 'column' names 'label', the spec's label: "
     "never a feature"),
])
def test_the_label_and_entity_key_are_never_step_inputs(step: dict, expected: str) -> None:
    assert build_error(step) == expected


def test_a_filter_may_read_the_label() -> None:
    build_pipeline(spec_with({"kind": "filter", "params": {"query": "label == label"}}))


def test_a_filter_before_an_aggregate_warns_of_skew() -> None:
    aggregate = {"kind": "entity_aggregate", "params": {"column": "x", "window": 3}}
    row_filter = {"kind": "filter", "params": {"query": "x > 0"}}

    with pytest.warns(SkewWarning, match="a filter comes before an entity_aggregate"):
        build_pipeline(spec_with(row_filter, aggregate))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_pipeline(spec_with(aggregate, row_filter))


def test_a_new_kind_registers_with_a_decorator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_KINDS", dict(registry_module._KINDS))

    @register("halve", reads=("columns",))
    def halve(columns: list[str], by: float = 2.0) -> OnColumns:
        return OnColumns(FunctionTransformer(lambda x: x / by), columns)

    assert "halve" in known_kinds()
    with pytest.raises(ValueError, match="'halve' is already registered"):
        register("halve")(halve)
    pipeline = build_pipeline(spec_with({"kind": "halve", "params": {"columns": ["x"]}}))
    assert pipeline.pipeline.steps[0][0] == "0_halve"
    with pytest.raises(InvalidInput, match=r"param 'by'"):
        build_pipeline(spec_with({"kind": "halve", "params": {"columns": ["x"], "by": "a"}}))
