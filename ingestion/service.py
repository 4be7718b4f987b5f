"""Ingestion Service: SourceDataAvailable → immutable raw batch → RawDataExtracted.

The batch id is the hash of the source bytes, so the same file twice is the same batch
and its work is not repeated (the event is simply re-published). A source that cannot be
read or breaks its dataset's contract yields IngestionFailed naming the problem.
"""

from __future__ import annotations

import logging

from common.config import PipelineConfig, load_pipeline_config
from common.errors import InvalidInput, NotFound
from common.events import IngestionFailed, RawDataExtracted, SourceDataAvailable
from common.runtime import Service, handles
from common.settings import Settings
from common.stores import RawBatch, RawBatchStore
from common.wiring import Stores
from ingestion.contract import (
    ContractChecker,
    ContractViolation,
    DatasetContract,
    typed_chunks,
)

log = logging.getLogger(__name__)
CHUNK_ROWS = 100_000


def check_batch(store: RawBatchStore, batch: RawBatch, contract: DatasetContract) -> int:
    """Check a stored batch against its contract chunk by chunk; returns rows quarantined."""
    checker = ContractChecker(contract, batch.source_uri)
    for _ in typed_chunks(store.iter_frames(batch.batch_id, CHUNK_ROWS), checker):
        pass  # memory stays bounded: one chunk at a time
    return checker.finish()


class IngestionService(Service):
    """Stores sources as raw batches and checks them against their dataset's contract."""

    name = "ingestion"
    concurrency = 2  # batches of different datasets go side by side
    prefetch = 1  # long handlers: leave waiting events to the other consumers

    def __init__(self, config: PipelineConfig, raw_store: RawBatchStore) -> None:
        self.config, self.raw_store = config, raw_store

    @handles(SourceDataAvailable)
    def on_source_data_available(
        self, event: SourceDataAvailable
    ) -> RawDataExtracted | IngestionFailed:
        """Store the source and announce the batch, or say why it was refused."""
        try:
            return self._ingest(event)
        except (InvalidInput, NotFound) as exc:
            log.warning("ingestion of %s refused: %s", event.uri, exc)
            problems = exc.problems if isinstance(exc, ContractViolation) else [str(exc)]
            return event.caused(
                IngestionFailed, producer=self.name, dataset=event.dataset, uri=event.uri,
                reason=str(exc), errors=problems,
            )

    def _ingest(self, event: SourceDataAvailable) -> RawDataExtracted:
        contract = self._contract(event.dataset)
        batch = self.raw_store.put(event.dataset, event.uri, event.format or contract.format)
        quarantined = check_batch(self.raw_store, batch, contract)
        self.raw_store.accept(batch.batch_id)
        log.info("stored batch %s: %d rows (%d quarantined)", batch.batch_id, batch.rows,
                 quarantined)
        return event.caused(
            RawDataExtracted, producer=self.name, dataset=event.dataset,
            batch_id=batch.batch_id, source_uri=event.uri, rows=batch.rows - quarantined,
            columns=batch.column_names,
        )

    def _contract(self, dataset: str) -> DatasetContract:
        if dataset not in self.config.datasets:
            known = ", ".join(sorted(self.config.datasets))
            raise InvalidInput(f"unknown dataset {dataset!r}; the pipeline config has: {known}")
        return self.config.datasets[dataset]


def build(settings: Settings) -> IngestionService:
    """The ingestion service for the settings."""
    config = load_pipeline_config(settings.pipeline_config)
    return IngestionService(config, Stores.from_settings(settings).raw)
