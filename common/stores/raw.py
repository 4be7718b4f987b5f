"""Raw data store: immutable batches of source data under a data root.

A batch is the source's original bytes, the same data as Parquet, and a manifest (JSON),
in ``raw/<batch_id>/`` under the root (a local folder or any fsspec URL). The
``batch_id`` is the first 24 hex characters (96 bits) of the SHA-256 of the raw bytes; the
manifest keeps the full digest. Storing the same bytes again finds the manifest and does
no work, which makes ingestion idempotent. The manifest is written last and every file
goes through a temporary name, so a crash never leaves a half batch that looks complete.
Sources are read in chunks, so memory does not grow with the file. Example::

    store = RawBatchStore("./var/data")
    batch = store.put("paysim", "data/tx.csv")          # format inferred from the name
    store.put("paysim", "data/tx.csv").batch_id == batch.batch_id   # no work the 2nd time
    frame = store.read_frame(batch.batch_id)
    for chunk in store.iter_frames(batch.batch_id, rows=50_000): ...
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Literal

import fsspec
import pandas as pd
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from common.errors import ImmutableBatchError, InvalidInput, NotFound
from common.events import utc_now
from common.stores._fs import DataRoot
from common.stores._parquet import Converted, to_parquet

Format = Literal["csv", "parquet", "jsonl"]
BATCH_ID_HEX = 24
"""Hex characters of the SHA-256 that make a batch id (96 bits)."""
COPY_CHUNK = 4 * 1024 * 1024
"""Bytes read at a time while hashing and copying a source."""
_SUFFIXES: dict[str, Format] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
_FORMATS: dict[str, Format] = {
    "csv": "csv",
    "parquet": "parquet",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
}


class RawBatch(BaseModel):
    """The manifest of a stored batch; its presence marks the batch complete."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_id: str = Field(description=f"First {BATCH_ID_HEX} hex characters of sha256.")
    dataset: str
    source_uri: str = Field(description="Where the bytes came from.")
    format: Format
    sha256: str = Field(description="Full SHA-256 of the original bytes, hex.")
    size_bytes: int = Field(ge=0)
    rows: int = Field(ge=0)
    columns: dict[str, str] = Field(description="Column name to Arrow type, in file order.")
    created_at: AwareDatetime
    paths: dict[str, str] = Field(description="original, parquet, manifest; relative to root.")

    @property
    def column_names(self) -> list[str]:
        """The columns, in file order."""
        return list(self.columns)


def infer_format(source_uri: str, fmt: str | None = None) -> Format:
    """The batch format named by ``fmt``, or inferred from the file name's suffix."""
    if fmt is not None:
        return _named_format(source_uri, fmt)
    name = source_uri.rsplit("/", 1)[-1].lower()
    for suffix, found in _SUFFIXES.items():
        if name.endswith(suffix):
            return found
    known = ", ".join(_SUFFIXES)
    raise InvalidInput(f"cannot infer the format of {source_uri}: unknown suffix (known: {known})")


def _named_format(source_uri: str, fmt: str) -> Format:
    try:
        return _FORMATS[fmt.lower()]
    except KeyError:
        known = ", ".join(_FORMATS)
        raise InvalidInput(f"unknown format {fmt!r} for {source_uri} (known: {known})") from None


def batch_paths(batch_id: str, fmt: Format) -> dict[str, str]:
    """Where a batch's files live, relative to the data root."""
    folder = f"raw/{batch_id}"
    return {
        "original": f"{folder}/original.{fmt}",
        "parquet": f"{folder}/data.parquet",
        "manifest": f"{folder}/manifest.json",
    }


@dataclass(frozen=True)
class _Source:
    """A source file about to be stored: where it is, its format and its digest."""

    uri: str
    fs: AbstractFileSystem
    path: str
    format: Format
    sha256: str
    size: int

    @property
    def batch_id(self) -> str:
        return self.sha256[:BATCH_ID_HEX]


class RawBatchStore:
    """Immutable raw batches under a data root (local folder or fsspec URL)."""

    def __init__(self, root: str, *, chunk_rows: int = 100_000):
        self._root = DataRoot(root)
        self._chunk_rows = chunk_rows

    def put(self, dataset: str, source_uri: str, fmt: str | None = None) -> RawBatch:
        """Store a source file as a batch, or return the batch that already holds its bytes.

        ``InvalidInput`` names the file when its format is unknown or it cannot be read;
        ``NotFound`` names it when it does not exist.
        """
        source = _inspect(source_uri, fmt)
        existing = self._existing(source, dataset)
        if existing is not None:
            return existing
        paths = batch_paths(source.batch_id, source.format)
        converted = self._write_data(source, paths)
        return self._write_manifest(dataset, source, paths, converted)

    def manifest(self, batch_id: str) -> RawBatch:
        """The manifest of a stored batch, or ``NotFound``."""
        if not self.exists(batch_id):
            raise NotFound("raw batch", batch_id)
        return RawBatch.model_validate_json(self._root.read_bytes(_manifest_path(batch_id)))

    def exists(self, batch_id: str) -> bool:
        """Whether a complete batch with this id is stored."""
        return _is_batch_id(batch_id) and self._root.exists(_manifest_path(batch_id))

    def read_frame(self, batch_id: str, columns: builtins.list[str] | None = None) -> pd.DataFrame:
        """The whole batch as a DataFrame (all columns, or the named ones)."""
        with self._root.open(self.manifest(batch_id).paths["parquet"]) as handle:
            return pq.read_table(handle, columns=columns).to_pandas()

    def iter_frames(self, batch_id: str, rows: int = 100_000) -> Iterator[pd.DataFrame]:
        """The batch as DataFrames of at most ``rows`` rows each, read lazily."""
        with self._root.open(self.manifest(batch_id).paths["parquet"]) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=rows):
                yield batch.to_pandas()

    def original_uri(self, batch_id: str) -> str:
        """The URL of the batch's original bytes."""
        return self._root.uri(self.manifest(batch_id).paths["original"])

    def list(
        self, dataset: str | None = None, *, accepted_only: bool = False
    ) -> builtins.list[RawBatch]:
        """Every complete batch (of one dataset, if named; accepted ones only, if asked),
        oldest first."""
        found = [
            RawBatch.model_validate_json(self._root.read_bytes(path))
            for path in self._root.glob("raw/*/manifest.json")
        ]
        chosen = [b for b in found if dataset is None or b.dataset == dataset]
        if accepted_only:
            chosen = [b for b in chosen if self.is_accepted(b.batch_id)]
        return sorted(chosen, key=lambda b: (b.created_at, b.batch_id))

    def accept(self, batch_id: str) -> None:
        """Record that a batch passed its dataset's contract (the batch itself never changes).

        A refused batch stays stored, for inspection, but is never accepted, so nothing
        downstream (a join waiting for the latest batch of an input) picks it up.
        """
        self.manifest(batch_id)
        self._root.write_bytes(_accepted_path(batch_id), b"{}")

    def is_accepted(self, batch_id: str) -> bool:
        """Whether the batch passed its dataset's contract."""
        return _is_batch_id(batch_id) and self._root.exists(_accepted_path(batch_id))

    def _existing(self, source: _Source, dataset: str) -> RawBatch | None:
        if not self.exists(source.batch_id):
            return None
        batch = self.manifest(source.batch_id)
        if batch.sha256 != source.sha256 or batch.dataset != dataset:
            raise ImmutableBatchError(
                f"raw batch {batch.batch_id} already holds {batch.source_uri} of dataset "
                f"{batch.dataset!r} (sha256 {batch.sha256}); it cannot also hold "
                f"{source.uri} for dataset {dataset!r}"
            )
        return batch

    def _write_data(self, source: _Source, paths: dict[str, str]) -> Converted:
        try:
            self._copy(source, paths["original"])
            return to_parquet(
                lambda: self._root.open(paths["original"]),
                source.format,
                lambda: self._root.atomic_open(paths["parquet"]),
                self._chunk_rows,
                source.uri,
            )
        except InvalidInput:
            self._root.remove_tree(f"raw/{source.batch_id}")  # nothing of a rejected source
            raise

    def _copy(self, source: _Source, target: str) -> None:
        hasher = hashlib.sha256()
        with source.fs.open(source.path, "rb") as src, self._root.atomic_open(target) as dst:
            for chunk in _chunks(src):
                hasher.update(chunk)
                dst.write(chunk)
            if hasher.hexdigest() != source.sha256:
                raise InvalidInput(f"source file {source.uri} changed while it was being stored")

    def _write_manifest(
        self, dataset: str, source: _Source, paths: dict[str, str], converted: Converted
    ) -> RawBatch:
        batch = RawBatch(
            batch_id=source.batch_id,
            dataset=dataset,
            source_uri=source.uri,
            format=source.format,
            sha256=source.sha256,
            size_bytes=source.size,
            rows=converted.rows,
            columns={f.name: str(f.type) for f in converted.schema},
            created_at=utc_now(),
            paths=paths,
        )
        # Last, and atomically: its presence is what marks the batch complete.
        self._root.write_bytes(paths["manifest"], batch.model_dump_json(indent=2).encode())
        return batch


def _inspect(source_uri: str, fmt: str | None) -> _Source:
    kind = infer_format(source_uri, fmt)
    fs, path = fsspec.core.url_to_fs(source_uri)
    if not fs.isfile(path):
        raise NotFound("source file", source_uri)
    digest, size = _digest(fs, path)
    return _Source(source_uri, fs, path, kind, digest, size)


def _digest(fs: AbstractFileSystem, path: str) -> tuple[str, int]:
    hasher, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        for chunk in _chunks(handle):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(COPY_CHUNK):
        yield chunk


def _manifest_path(batch_id: str) -> str:
    return f"raw/{batch_id}/manifest.json"


def _accepted_path(batch_id: str) -> str:
    return f"raw/{batch_id}/accepted.json"


def _is_batch_id(batch_id: str) -> bool:
    return len(batch_id) == BATCH_ID_HEX and all(c in "0123456789abcdef" for c in batch_id)
