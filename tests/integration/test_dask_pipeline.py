"""The pipeline on ``CONVEYOR_COMPUTE=dask-local`` through the real RabbitMQ and Redis:
SourceDataAvailable to ModelReady, the services sharing one LocalCluster of two workers;
the raw batch stored as parts, the feature set written as parts by the workers and equal
to what pandas makes of the same batch, its online rows in Redis. (A batch this small is
one part: the parity of several partitions is tests/integration/test_dask_parity.py's.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from common.events import (
    Event,
    FeaturesGenerated,
    ModelReady,
    RawDataExtracted,
    SourceDataAvailable,
)
from common.wiring import Stores
from ingestion.contract import read_batch
from preparation import build_pipeline
from tests.fixtures.pipeline import one_of, parsed, paysim_config, pipeline_namespace, write_paysim
from tests.fixtures.warm import warm_training_workers
from tests.support.harness import BusNamespace, running_consumer, running_services, wait_for_handler

pytestmark = [pytest.mark.integration, pytest.mark.slow]
warm_training_workers()

STAGES = ("ingestion", "preparation", "training", "evaluation")
WATCHED = ("RawDataExtracted", "FeaturesGenerated", "ModelReady", "ModelRejected",
           "IngestionFailed")
ROWS = 4_000


@pytest.fixture
def ns(tmp_path: Path, services_up: None, monkeypatch: pytest.MonkeyPatch
       ) -> Iterator[BusNamespace]:
    for name, value in {"CONVEYOR_COMPUTE": "dask-local", "CONVEYOR_DASK_WORKERS": "2",
                        "CONVEYOR_DASK_MEMORY_LIMIT": "1GB"}.items():
        monkeypatch.setenv(name, value)
    namespace = pipeline_namespace(tmp_path, paysim_config())
    yield namespace
    namespace.close()


def test_source_to_model_ready_on_a_local_cluster(ns: BusNamespace, tmp_path: Path) -> None:
    path = write_paysim(tmp_path / "transactions.csv", ROWS, seed=6)
    seen: list[Event] = []
    watch = ns.dispatcher("watch", dict.fromkeys(WATCHED, seen.append))
    stores = Stores.from_settings(ns.settings)
    with running_services(ns, STAGES, timeout=60), running_consumer(ns.bus(), watch), \
            wait_for_handler(watch, "ModelReady", timeout=240):
        ns.bus().publish(SourceDataAvailable(dataset="paysim", uri=str(path), producer="test"))

    raw, features = one_of(RawDataExtracted, seen), one_of(FeaturesGenerated, seen)
    ready = one_of(ModelReady, seen)
    model = stores.models.metadata(ready.model_id)
    assert model.metadata["feature_set_id"] == features.feature_set_id
    assert stores.raw.manifest(raw.batch_id).partitioned
    folder = Path(ns.settings.data_root) / "features" / features.feature_set_id
    assert list((folder / "features.parquet").glob("part-*.parquet"))  # written as parts
    config = parsed(paysim_config())
    frame = read_batch(stores.raw, raw.batch_id, config.datasets["paysim"])
    fitted = build_pipeline(config.features).fit(config.split.apply(frame, "isFraud").train,
                                                 [raw.batch_id])
    want = fitted.transform(frame)
    pd.testing.assert_frame_equal(stores.offline.read(features.feature_set_id), want,
                                  check_exact=False, rtol=0, atol=1e-12)
    last = frame["nameOrig"].iloc[-1]
    [online] = stores.online.read(features.feature_set_id, [last])
    assert online is not None
    stores.redis.close()
