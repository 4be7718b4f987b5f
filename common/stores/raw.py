"""Raw data store: immutable batches of source data under a data root.

A batch is the source's original bytes, the same data as Parquet (one file, or with
``partitioned=True`` a folder of parts, one per chunk, which a Dask cluster reads a part
per task), and a manifest (JSON), in ``raw/<batch_id>/`` under the root (a local folder or
any fsspec URL). The ``batch_id`` is the first 24 hex characters (96 bits) of the SHA-256
of the raw bytes; the manifest keeps the full digest. Storing the same bytes again finds
the manifest and does no work, which makes ingestion idempotent. The manifest is written
last and every file goes through a temporary name, so a crash never leaves a half batch
that looks complete. Sources are read in chunks, so memory does not grow with the file;
the copy of the original bytes is written on a thread of its own while the Parquet is
converted.

With a ``typing`` (ingestion passes its dataset contract's), each chunk is checked and
typed on its way into the Parquet, which then holds the typed rows (``typed_by`` in the
manifest names the typing, ``rows_set_aside`` counts the rows it quarantined); a source
the typing refuses is stored as read (``typed_by`` None), still for inspection. Example::

    store = RawBatchStore("./var/data")
    batch = store.put("paysim", "data/tx.csv")          # format inferred from the name
    store.put("paysim", "data/tx.csv").batch_id == batch.batch_id   # no work the 2nd time
    frame = store.read_frame(batch.batch_id)
    for chunk in store.iter_frames(batch.batch_id, rows=50_000): ...
    for piece in store.pieces(batch.batch_id): store.read_piece(piece)  # in parallel
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Literal, cast

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from common.errors import ImmutableBatchError, InvalidInput, NotFound
from common.events import utc_now
from common.stores._fs import DataRoot
from common.stores._parquet import (
    ChunkTyping,
    Converted,
    Opener,
    Parts,
    read_frames,
    to_parquet,
)

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
    typed_by: str | None = Field(
        default=None, description="The typing that checked and typed the Parquet's rows; "
        "None: the Parquet holds the source as read.")
    rows_set_aside: int = Field(
        default=0, ge=0, description="Source rows the typing set aside (not in the Parquet).")
    partitioned: bool = Field(
        default=False, description="The Parquet is a folder of parts (``parts/``), not a "
        "file; the parts in name order are the rows in order.")

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


def batch_paths(batch_id: str, fmt: Format, partitioned: bool = False) -> dict[str, str]:
    """Where a batch's files live, relative to the data root (partitioned: the Parquet is
    the folder ``parts/``)."""
    folder = f"raw/{batch_id}"
    return {
        "original": f"{folder}/original.{fmt}",
        "parquet": f"{folder}/parts" if partitioned else f"{folder}/data.parquet",
        "manifest": f"{folder}/manifest.json",
    }


def part_name(number: int) -> str:
    """A part's file name: the name order is the row order."""
    return f"part-{number:05d}.parquet"


@dataclass(frozen=True)
class RawPiece:
    """A piece of a batch's Parquet that one task reads: a part, or a row group of the
    one file; ``first_row`` is the batch position of its first row."""

    path: str
    row_group: int | None
    rows: int
    first_row: int


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
        self._root_url = root
        self._chunk_rows = chunk_rows

    @property
    def root(self) -> str:
        """The data root (a folder or fsspec URL), as given: what a worker opens it with."""
        return self._root_url

    def put(self, dataset: str, source_uri: str, fmt: str | None = None, *,
            typing: ChunkTyping | None = None, partitioned: bool = False) -> RawBatch:
        """Store a source file as a batch, or return the batch that already holds its bytes
        (as it was stored: its ``typed_by`` says by which typing, if any).

        ``typing`` checks and types each chunk as it is stored (see the module docstring);
        ``partitioned`` writes the Parquet as parts, one per chunk (a batch already stored
        keeps its layout: readers take both).
        ``InvalidInput`` names the file when its format is unknown or it cannot be read;
        ``NotFound`` names it when it does not exist.
        """
        source = _inspect(source_uri, fmt)
        existing = self._existing(source, dataset)
        if existing is not None:
            return existing
        paths = batch_paths(source.batch_id, source.format, partitioned)
        converted = self._write_data(source, paths, typing, partitioned)
        typed_by = typing.name if typing is not None and converted.typed else None
        return self._write_manifest(dataset, source, paths, converted, typed_by, partitioned)

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
        tables = []
        for path in self._parquet_files(self.manifest(batch_id)):
            with self._root.open(path) as handle:
                tables.append(pq.read_table(handle, columns=columns))
        # One table, as one file gives: a category column's dictionaries are unified.
        return pa.concat_tables(tables).to_pandas() if len(tables) > 1 else tables[0].to_pandas()

    def iter_frames(self, batch_id: str, rows: int = 100_000) -> Iterator[pd.DataFrame]:
        """The batch as DataFrames of at most ``rows`` rows each, read lazily."""
        for path in self._parquet_files(self.manifest(batch_id)):
            with self._root.open(path) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=rows):
                    yield batch.to_pandas()

    def pieces(self, batch_id: str) -> builtins.list[RawPiece]:
        """The batch's Parquet as pieces to read apart (each part, or each row group of
        the one file), in row order, from the files' footers."""
        batch, found, first = self.manifest(batch_id), [], 0
        for path in self._parquet_files(batch):
            with self._root.open(path) as handle:
                meta = pq.ParquetFile(handle).metadata
            groups: builtins.list[int | None] = (
                [None] if batch.partitioned else list(range(meta.num_row_groups)))
            for group in groups:
                rows = meta.num_rows if group is None else meta.row_group(group).num_rows
                found.append(RawPiece(path, group, rows, first))
                first += rows
        return found

    def read_piece(self, piece: RawPiece,
                   columns: builtins.list[str] | None = None) -> pd.DataFrame:
        """One piece's rows (all columns, or the named ones), indexed by batch position."""
        with self._root.open(piece.path) as handle:
            file = pq.ParquetFile(handle)
            table = (file.read(columns=columns) if piece.row_group is None
                     else file.read_row_group(piece.row_group, columns=columns))
        frame = table.to_pandas()
        return frame.set_axis(pd.RangeIndex(piece.first_row, piece.first_row + len(frame)))

    def _parquet_files(self, batch: RawBatch) -> builtins.list[str]:
        if not batch.partitioned:
            return [batch.paths["parquet"]]
        return self._root.glob(f"{batch.paths['parquet']}/part-*.parquet")

    def iter_source_frames(
        self, batch_id: str, rows: int = 100_000, text_columns: Collection[str] = ()
    ) -> Iterator[pd.DataFrame]:
        """The batch's original bytes as pandas reads them, ``rows`` at a time (each chunk's
        types inferred on its own; ``text_columns`` as text): all the source's rows, even
        where a typing set some aside from the Parquet."""
        batch = self.manifest(batch_id)
        with self._root.open(batch.paths["original"]) as handle:
            yield from read_frames(handle, batch.format, rows, text_columns)

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

    def _write_data(
        self, source: _Source, paths: dict[str, str], typing: ChunkTyping | None,
        partitioned: bool,
    ) -> Converted:
        # The copy (I/O, GIL released) on a thread while this one parses: both read the
        # source, and each checks that the bytes it read are the ones the id was made of.
        with ThreadPoolExecutor(1, thread_name_prefix="raw-copy") as pool:
            copied = pool.submit(self._copy, source, paths["original"])
            try:
                converted = to_parquet(
                    self._reader(source, paths["original"], copied),
                    source.format,
                    self._target(paths["parquet"], partitioned),
                    self._chunk_rows,
                    source.uri,
                    typing,
                )
                copied.result()
                return converted
            except InvalidInput:
                copied.exception()  # wait for the copy, whatever it did, then remove it
                self._root.remove_tree(f"raw/{source.batch_id}")  # nothing of a rejected source
                raise

    def _target(self, path: str, partitioned: bool) -> Opener | Parts:
        if not partitioned:
            return lambda: self._root.atomic_open(path)
        return Parts(start=lambda: self._root.remove_tree(path),
                     open=lambda number: self._root.atomic_open(f"{path}/{part_name(number)}"))

    def _reader(self, source: _Source, original: str, copied: Future[None]) -> Opener:
        """What the conversion reads: the source, verified as it is read; for Parquet,
        which is read out of order, the copy once it is complete and verified."""
        if source.format != "parquet":
            return lambda: _Verified(source)

        def copy() -> IO[bytes]:
            copied.result()
            return self._root.open(original)

        return copy

    def _copy(self, source: _Source, target: str) -> None:
        reader = _Verified(source)
        with reader, self._root.atomic_open(target) as dst:
            while chunk := reader.read(COPY_CHUNK):
                dst.write(chunk)
            reader.verify()

    def _write_manifest(
        self, dataset: str, source: _Source, paths: dict[str, str], converted: Converted,
        typed_by: str | None, partitioned: bool = False,
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
            typed_by=typed_by,
            rows_set_aside=converted.set_aside,
            partitioned=partitioned,
        )
        # Last, and atomically: its presence is what marks the batch complete.
        self._root.write_bytes(paths["manifest"], batch.model_dump_json(indent=2).encode())
        return batch


class _Verified:
    """The source opened for reading, hashing what is read: reading it to the end and
    calling ``verify`` raises ``InvalidInput`` if the bytes are not the ones it had."""

    def __init__(self, source: _Source) -> None:
        self.source, self.hasher = source, hashlib.sha256()
        self.handle: IO[bytes] = source.fs.open(source.path, "rb")

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.hasher.update(data)
        if not data:
            self.verify()  # the end: what was read must be the source's bytes
        return data

    def verify(self) -> None:
        if self.hasher.hexdigest() != self.source.sha256:
            raise InvalidInput(
                f"source file {self.source.uri} changed while it was being stored")

    def readline(self, size: int = -1) -> bytes:
        line = self.handle.readline(size)
        self.hasher.update(line)
        if not line:
            self.verify()
        return line

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def __getattr__(self, name: str) -> object:
        return getattr(self.handle, name)  # mode, closed, readable...

    def __enter__(self) -> IO[bytes]:
        return cast(IO[bytes], self)  # the reads that matter go through this wrapper

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


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
