"""Ingestion Service: SourceDataAvailable → immutable raw batch → RawDataExtracted.

The batch id is the hash of the source bytes, so the same file twice is the same batch
and its work is not repeated (the event is simply re-published). The source is checked
and typed by its dataset's contract chunk by chunk as it is stored, so the batch is read
once. A source that cannot be read or breaks the contract yields IngestionFailed naming
the problem; a refused batch stays stored, as read, but is never accepted. A URI the
source policy does not allow (``ingestion.sources``: schemes and roots from the settings)
is refused before a byte of it is read.

With ``CONVEYOR_COMPUTE`` set to a Dask target the typed Parquet is written as parts, one
per chunk (``RawBatchStore.put(..., partitioned=True)``), so preparation's cluster reads
the batch a part per task; the typing itself still streams through this process, a chunk
at a time, so its memory stays bounded whatever the batch's size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from common.compute import compute_settings
from common.errors import InvalidInput, NotFound
from common.events import IngestionFailed, RawDataExtracted, SourceDataAvailable
from common.runtime import Service, handles
from common.settings import Settings
from common.stores import RawBatch, RawBatchStore
from common.wiring import Stores
from ingestion.contract import (
    ContractChecker,
    ContractTyping,
    ContractViolation,
    DatasetContract,
    batch_frames,
    typed_chunks,
    typing_id,
)
from ingestion.sources import SourcePolicy

log = logging.getLogger(__name__)
CHUNK_ROWS = 100_000


def check_batch(store: RawBatchStore, batch: RawBatch, contract: DatasetContract) -> int:
    """Check a stored batch against its contract chunk by chunk; returns rows quarantined.

    A batch the contract typed as it was stored passed then (its manifest counts the rows
    set aside); any other (refused, so stored as read, or stored under another contract)
    is read and checked now, and ``ContractViolation`` names what is wrong.
    """
    if batch.typed_by == typing_id(contract):
        return batch.rows_set_aside
    checker = ContractChecker(contract, batch.source_uri)
    for _ in typed_chunks(batch_frames(store, batch, contract, CHUNK_ROWS), checker):
        pass  # memory stays bounded: one chunk at a time
    return checker.finish()


def valid_rows(batch: RawBatch, quarantined: int) -> int:
    """Rows of an accepted batch that downstream stages see (quarantined ones excluded)."""
    return batch.rows + batch.rows_set_aside - quarantined  # the source's rows, less those


@runtime_checkable
class IngestionSections(Protocol):
    """What ingestion reads of the pipeline config: the datasets' contracts."""

    @property
    def datasets(self) -> Mapping[str, DatasetContract]:
        """Contracts of the datasets the pipeline reads, by dataset name."""


class IngestionService(Service):
    """Stores sources as raw batches and checks them against their dataset's contract."""

    name = "ingestion"
    concurrency = 2  # batches of different datasets go side by side
    prefetch = 1  # long handlers: leave waiting events to the other consumers

    def __init__(self, config: IngestionSections, raw_store: RawBatchStore,
                 sources: SourcePolicy | None = None, *, partitioned: bool = False) -> None:
        self.config, self.raw_store, self.partitioned = config, raw_store, partitioned
        # None: the policy of the environment's settings, never "anything goes"
        self.sources = sources or SourcePolicy.from_settings(Settings())

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
        readable = self.sources.check(event.uri)  # SourceRefused names the URI and the rule
        batch = self.raw_store.put(event.dataset, readable, event.format or contract.format,
                                   typing=ContractTyping(contract, event.uri),
                                   partitioned=self.partitioned)
        quarantined = check_batch(self.raw_store, batch, contract)
        self.raw_store.accept(batch.batch_id)
        rows = valid_rows(batch, quarantined)
        log.info("stored batch %s: %d rows (%d quarantined)", batch.batch_id, rows, quarantined)
        return event.caused(
            RawDataExtracted, producer=self.name, dataset=event.dataset,
            batch_id=batch.batch_id, source_uri=event.uri, rows=rows,
            columns=batch.column_names,
        )

    def _contract(self, dataset: str) -> DatasetContract:
        if dataset not in self.config.datasets:
            known = ", ".join(sorted(self.config.datasets))
            raise InvalidInput(f"unknown dataset {dataset!r}; the pipeline config has: {known}")
        return self.config.datasets[dataset]


def build(settings: Settings, config: IngestionSections) -> IngestionService:
    """The ingestion service for the settings and the pipeline config."""
    return IngestionService(config, Stores.from_settings(settings).raw,
                            SourcePolicy.from_settings(settings),
                            partitioned=compute_settings().mode != "local")
