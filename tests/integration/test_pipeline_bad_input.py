"""Bad input on the real RabbitMQ and Redis: a clear error, and the services keep consuming.

Each test runs the services as ``conveyor run`` runs them (threads here), publishes the
bad input and then a good one, and asserts on the error's words (they must name the
file, the column, the rows or the candidate) and on the good one going through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.bus.dispatch import ERROR_TYPE, FAILED_SERVICE
from common.datasets import paysim
from common.events import (
    CandidatesTrained,
    IngestionFailed,
    ModelReady,
    RawDataExtracted,
    SourceDataAvailable,
    parse_event,
)
from common.wiring import Stores
from tests.fixtures.pipeline import (
    as_event,
    paysim_config,
    pipeline_namespace,
    watcher,
    write_paysim,
)
from tests.fixtures.warm import warm_training_workers
from tests.support.harness import (
    BusNamespace,
    running_consumer,
    running_services,
    wait_for_handler,
    wait_until,
)

pytestmark = pytest.mark.integration
warm_training_workers()

ROWS = 3_000
STAGES = ("ingestion", "preparation", "training", "evaluation")
Writer = Callable[[Path], Path]


def source(path: Path) -> SourceDataAvailable:
    return SourceDataAvailable(dataset="paysim", uri=str(path), producer="test")


def good(tmp_path: Path, seed: int = 1) -> Path:
    return write_paysim(tmp_path / f"good-{seed}.csv", ROWS, seed=seed)


@pytest.fixture
def ns(tmp_path: Path, services_up: None) -> Iterator[BusNamespace]:
    namespace = pipeline_namespace(tmp_path, paysim_config())
    yield namespace
    namespace.close()


# -- sources ingestion refuses -----------------------------------------------------------


def missing(tmp_path: Path) -> Path:
    return tmp_path / "absent.csv"


def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.csv"
    path.write_bytes(bytes(range(256)) * 16)
    return path


def fake_parquet(tmp_path: Path) -> Path:
    path = tmp_path / "fake.parquet"
    path.write_text("step,type\n1,PAYMENT\n")
    return path


def without_columns(tmp_path: Path) -> Path:
    path = tmp_path / "no-amount.csv"
    paysim(100, seed=3).drop(columns=["amount", "nameOrig"]).to_csv(path, index=False)
    return path


def mistyped(tmp_path: Path) -> Path:
    frame = paysim(300, seed=3).astype({"amount": object, "step": object})
    frame.loc[[7, 123], "amount"] = "lots"
    frame.loc[50, "step"] = "x"
    path = tmp_path / "mistyped.csv"
    frame.to_csv(path, index=False)
    return path


def empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    return path


def header_only(tmp_path: Path) -> Path:
    path = tmp_path / "header-only.csv"
    paysim(10, seed=3).head(0).to_csv(path, index=False)
    return path


INVALID = b'{"event_type": "SourceDataAvailable", "dataset": "paysim", "producer": "x"}'
REFUSED: list[tuple[Writer, list[str]]] = [
    (missing, ["source file {uri} not found"]),
    (garbage, ["cannot read {uri} as csv: 'utf-8' codec can't decode byte"]),
    (fake_parquet, ["cannot read {uri} as parquet:", "not a parquet file"]),
    (without_columns, ["{uri} breaks the dataset contract: missing column(s) "
                       "['amount', 'nameOrig'] (found: isFlaggedFraud, isFraud, nameDest,"]),
    (mistyped, ["{uri} breaks the dataset contract: 3 of 300 row(s) with mistyped values in "
                "['amount', 'step']; first: row 7: amount='lots' is not float, "
                "row 50: step='x' is not int, row 123: amount='lots' is not float"]),
    (empty, ["cannot read {uri} as csv: No columns to parse from file"]),
    (header_only, ["{uri} breaks the dataset contract: the file has no rows"]),
]


def test_ingestion_refuses_bad_sources_by_name_and_goes_on(
    ns: BusNamespace, tmp_path: Path
) -> None:
    bad = {write.__name__: source(write(tmp_path)) for write, _ in REFUSED}
    fine = source(good(tmp_path))
    watch = watcher(ns, ("IngestionFailed", "RawDataExtracted"))

    with running_services(ns, ["ingestion"]), running_consumer(ns.bus(), watch), \
            wait_for_handler(watch, "IngestionFailed", count=len(bad)) as failed, \
            wait_for_handler(watch, "RawDataExtracted") as extracted:
        for event in bad.values():
            ns.bus().publish(event)
        ns.bus().publish_raw("SourceDataAvailable", INVALID)
        ns.bus().publish(fine)
        [letter] = wait_until(lambda: ns.bus().dead_letters("ingestion"), message="a letter")

    refusals = {call.event.causation_id: as_event(IngestionFailed, call.event)
                for call in failed.calls}
    for write, expected in REFUSED:
        event = bad[write.__name__]
        refusal = refusals[event.event_id]
        assert (refusal.uri, refusal.dataset) == (event.uri, "paysim"), write.__name__
        for words in expected:
            assert words.format(uri=event.uri) in refusal.reason, (write.__name__, refusal.reason)
        assert refusal.errors and all(e in refusal.reason for e in refusal.errors)
    raw = as_event(RawDataExtracted, extracted.event)
    assert raw.causation_id == fine.event_id  # it went on with the next source
    assert raw.source_uri == fine.uri and raw.rows == ROWS
    # A message that is not a valid event is dead-lettered at once, naming the field.
    assert letter.error == (
        "InvalidEvent: invalid event SourceDataAvailable in field 'uri': Field required")
    assert letter.headers[FAILED_SERVICE] == "ingestion"


# -- data training cannot use ----------------------------------------------------------


def single_class(tmp_path: Path) -> Path:
    path = tmp_path / "no-fraud.csv"
    paysim(ROWS, seed=5).assign(isFraud=0).to_csv(path, index=False)
    return path


def test_a_label_with_a_single_class_is_dead_lettered_naming_the_label(
    ns: BusNamespace, tmp_path: Path
) -> None:
    bad, fine = source(single_class(tmp_path)), source(good(tmp_path))
    watch = watcher(ns, ("ModelReady",))

    with running_services(ns, STAGES), running_consumer(ns.bus(), watch), \
            wait_for_handler(watch, "ModelReady", timeout=60) as ready:
        ns.bus().publish(bad)
        ns.bus().publish(fine)
    [letter] = wait_until(lambda: ns.bus().dead_letters("training"), message="a dead letter")

    assert ready.event.correlation_id == fine.correlation_id  # the good run went through
    assert letter.headers[ERROR_TYPE] == "InvalidInput"
    assert "label 'isFraud' of feature set" in letter.error
    assert "has a single value [0] in the training part; nothing to learn" in letter.error
    assert letter.routing_key == "FeaturesGenerated"
    assert parse_event(letter.body).correlation_id == bad.correlation_id


def failing_candidate_config() -> dict[str, Any]:
    boom = {"name": "boom", "estimator": "tests.fixtures.models.FailingClassifier",
            "params": {"message": "boom cannot fit"}}
    logreg = {"name": "logreg", "estimator": "LogisticRegression", "params": {"max_iter": 300}}
    return paysim_config(training={"candidates": [boom, logreg]})


def test_a_candidate_that_raises_is_named_and_the_other_one_wins(
    tmp_path: Path, services_up: None
) -> None:
    ns = pipeline_namespace(tmp_path, failing_candidate_config())
    watch = watcher(ns, ("CandidatesTrained", "ModelReady"))
    fine = source(good(tmp_path))
    try:
        with running_services(ns, STAGES), running_consumer(ns.bus(), watch), \
                wait_for_handler(watch, "CandidatesTrained", timeout=60) as trained, \
                wait_for_handler(watch, "ModelReady", timeout=60) as ready:
            ns.bus().publish(fine)
        champion = as_event(ModelReady, ready.event)
        winner = Stores.from_settings(ns.settings).models.metadata(champion.model_id)
    finally:
        ns.close()

    event = as_event(CandidatesTrained, trained.event)
    assert [(f.name, f.error) for f in event.failures] == [
        ("boom", "ValueError: boom cannot fit")]
    assert event.model_ids == [champion.model_id] and winner.metadata["name"] == "logreg"
    assert champion.version == "v1" and winner.status == "champion"

