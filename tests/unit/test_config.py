"""The pipeline config: the shipped files load, and every error names the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import PipelineConfig, load_pipeline_config, parse_pipeline_config
from common.errors import InvalidInput
from tests.fixtures.breast_cancer import CONFIG as BREAST_CANCER_CONFIG
from tests.fixtures.pipeline import PAYSIM_CONFIG, write_config


def paysim() -> dict[str, Any]:
    return yaml.safe_load(PAYSIM_CONFIG.read_text())


def load_error(path: Path) -> str:
    with pytest.raises(InvalidInput) as caught:
        load_pipeline_config(path)
    return str(caught.value)


def test_the_shipped_paysim_config_loads() -> None:
    config = load_pipeline_config(PAYSIM_CONFIG)
    assert config.name == "fraud"
    assert config.datasets["paysim"].entity_key == "nameOrig"
    assert config.reads("paysim") and not config.reads("accounts")
    assert [c.name for c in config.training.candidates] == ["hgb", "logreg"]


def test_the_breast_cancer_fixture_config_loads() -> None:
    config = load_pipeline_config(BREAST_CANCER_CONFIG)
    assert config.datasets["breast_cancer"].label == "malignant"
    assert config.evaluation.metric == "roc_auc"


def test_a_typo_in_a_candidate_names_the_file_and_the_key(tmp_path: Path) -> None:
    data = paysim()
    data["training"]["candidates"][0]["paramz"] = data["training"]["candidates"][0].pop("params")
    path = write_config(tmp_path / "typo.yaml", data)

    message = load_error(path)
    assert message.startswith(f"{path}: ")
    assert "'training.candidates[0].paramz': Extra inputs are not permitted" in message


def test_an_unknown_dataset_in_feature_inputs_is_named(tmp_path: Path) -> None:
    data = paysim()
    data["features"]["inputs"] = ["transactions"]
    path = write_config(tmp_path / "inputs.yaml", data)

    message = load_error(path)
    assert str(path) in message
    assert "features.inputs name unknown dataset(s) ['transactions']" in message


def test_a_mistyped_contract_column_names_its_path(tmp_path: Path) -> None:
    data = paysim()
    data["datasets"]["paysim"]["columns"]["amount"] = "money"
    message = load_error(write_config(tmp_path / "types.yaml", data))
    assert "'datasets.paysim.columns.amount'" in message and "'float'" in message


def test_invalid_yaml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: fraud\ndatasets: [unclosed\n")

    message = load_error(path)
    assert message.startswith(f"pipeline config {path} is not valid YAML")
    assert "line" in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert load_error(path) == f"pipeline config {path} not found"


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- name: fraud\n")
    assert load_error(path) == f"{path}: expected a mapping at the top level"


def test_parse_names_every_bad_key_at_once() -> None:
    data = paysim()
    data["split"]["ratoi"] = 0.5
    data["evaluation"]["metric"] = "accuracy_score"
    with pytest.raises(InvalidInput) as caught:
        parse_pipeline_config(data, "inline")
    message = str(caught.value)
    assert message.startswith("inline: ")
    assert "'split.ratoi'" in message and "'evaluation.metric'" in message


def test_sections_with_defaults_may_be_left_out() -> None:
    data = paysim()
    del data["split"], data["evaluation"]
    config = parse_pipeline_config(data)
    assert isinstance(config, PipelineConfig)
    assert config.split.strategy == "random" and config.evaluation.minimum is None
