"""Chunked conversion of a CSV, JSON-lines or Parquet source to one Parquet file.

Memory stays bounded by the chunk size: pandas reads ``chunk_rows`` rows at a time (Parquet
sources are read one record batch at a time) and ``pyarrow.parquet.ParquetWriter`` appends
each chunk as a row group. Pandas infers types per chunk, so a later chunk can disagree
with the first one that fixed the file's schema (an int column meets a missing value and
turns float, a number column meets text, a JSON line brings a new key). The conversion
then starts over with the wider type forced for that column; every restart widens at
least one column, so restarts are few. A CSV's result does not depend on the chunk size
(text columns keep their exact text); a JSON field mixing numbers and text becomes text.

The target is one file (an ``Opener``) or ``Parts``: a folder of Parquet files, one per
chunk (partitioned Parquet, which a Dask cluster reads a part per task); the parts share
the first chunk's schema, as the row groups of one file do.

An optional ``ChunkTyping`` checks and types each chunk on its way in (ingestion's dataset
contract), so the file holds the typed data and no second pass is needed; the pandas
dtypes (``string``, ``Int64``, ``category``...) are kept in the file's pandas metadata and
come back on read. When the typing refuses the source (it raises ``KeepAsRead``), the
conversion starts over without it: the file holds the source as read. Example::

    result = to_parquet(lambda: open("tx.csv", "rb"), "csv",
                        lambda: root.atomic_open("raw/x/data.parquet"), chunk_rows=100_000)
    result.rows, result.schema, result.typed
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import InvalidInput

Opener = Callable[[], AbstractContextManager[IO[bytes]]]
PartOpener = Callable[[int], AbstractContextManager[IO[bytes]]]
_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError)
# What a malformed source raises (pandas' parser errors and ArrowInvalid are ValueErrors);
# I/O errors stay I/O errors, so a full disk is retried rather than blamed on the input.
_READ_ERRORS = (ValueError, pa.ArrowTypeError, pa.ArrowNotImplementedError)


@dataclass(frozen=True)
class Converted:
    """What a conversion wrote: the Parquet schema, the number of rows, whether a typing
    typed them, and how many source rows it set aside (not written)."""

    schema: pa.Schema
    rows: int
    typed: bool = False
    set_aside: int = 0


class KeepAsRead(Exception):
    """Raised by a ``ChunkTyping``: store the source as read, untyped (it refuses it)."""


class ChunkTyping(Protocol):
    """Checks and types a source's rows, chunk by chunk, while it is converted."""

    name: str
    """What typed the rows (a raw batch's manifest records it): same name, same typing."""
    @property
    def text_columns(self) -> Collection[str]:
        """Columns read as text, whatever they look like (a CSV's "007" stays "007")."""

    def start(self) -> None:
        """A conversion (re)starts: forget the chunks seen so far."""

    def __call__(self, chunk: pd.DataFrame, first_row: int) -> pd.DataFrame:
        """The chunk to store (typed; rows may be set aside); ``first_row`` is the number
        of its first row in the source. Raises ``KeepAsRead`` to store the source as read."""

    def finish(self) -> int:
        """Every chunk was seen: the rows set aside. Raises ``KeepAsRead`` like a chunk."""


@dataclass(frozen=True)
class Parts:
    """A partitioned target: ``start`` empties the folder (a conversion starts or starts
    over), ``open(number)`` writes part ``number`` (atomically, as every store file)."""

    start: Callable[[], None]
    open: PartOpener


@dataclass
class _Layout:
    """What earlier attempts learned: every column, in order, and the types to force."""

    columns: list[str] = field(default_factory=list)
    forced: dict[str, pa.DataType] = field(default_factory=dict)


class _Drift(Exception):
    """A chunk does not fit the schema fixed by the first chunk: start over, wider."""

    def __init__(self, layout: _Layout):
        super().__init__("schema drift")
        self.layout = layout


def to_parquet(source: Opener, fmt: str, target: Opener | Parts, chunk_rows: int, name: str,
               typing: ChunkTyping | None = None) -> Converted:
    """Convert ``source`` (opened anew per attempt) to Parquet written through ``target``,
    each chunk through ``typing`` if given (as read if it raises ``KeepAsRead``)."""
    if typing is not None:
        try:
            return _convert(source, fmt, target, chunk_rows, name, typing)
        except KeepAsRead:
            pass  # the typing refuses the source: it is stored as read, for inspection
    return _convert(source, fmt, target, chunk_rows, name, None)


def _convert(source: Opener, fmt: str, target: Opener | Parts, chunk_rows: int, name: str,
             typing: ChunkTyping | None) -> Converted:
    layout = _Layout()
    while True:
        try:
            return _attempt(source, fmt, target, chunk_rows, layout, typing)
        except _Drift as drift:
            if drift.layout == layout:
                raise InvalidInput(f"cannot reconcile the column types of {name}") from None
            layout = drift.layout
        except _READ_ERRORS as exc:
            raise InvalidInput(f"cannot read {name} as {fmt}: {exc}") from exc


def _attempt(source: Opener, fmt: str, target: Opener | Parts, chunk_rows: int,
             layout: _Layout, typing: ChunkTyping | None) -> Converted:
    if typing is not None:
        typing.start()
    if isinstance(target, Parts):
        target.start()  # nothing of an earlier attempt stays among the parts
    with source() as src, _single(target) as dst:
        tables = _tables(src, fmt, chunk_rows, layout, typing)
        typed = typing is not None
        if isinstance(target, Parts):
            converted = _write_parts(tables, target, layout, typed)
        else:
            assert dst is not None  # one file: _single opened it
            converted = _write(tables, dst, layout, typed)
        if typing is None:
            return converted
        # Inside the target: a source refused only now never lands typed.
        set_aside = typing.finish()
        return Converted(converted.schema, converted.rows, typed=True, set_aside=set_aside)


def _write(tables: Iterator[pa.Table], dst: IO[bytes], layout: _Layout,
           typed: bool = False) -> Converted:
    first = next(tables, None)
    if first is None:
        pq.write_table(pa.table({}), dst)
        return Converted(pa.schema([]), 0)
    rows = first.num_rows
    with pq.ParquetWriter(dst, first.schema, **(_typed_options(first.schema) if typed else {})
                          ) as writer:
        writer.write_table(first)
        for table in tables:
            writer.write_table(_conform(table, first.schema, layout))
            rows += table.num_rows
    return Converted(first.schema, rows)


def _single(target: Opener | Parts) -> AbstractContextManager[IO[bytes] | None]:
    return nullcontext() if isinstance(target, Parts) else target()


def _write_parts(tables: Iterator[pa.Table], target: Parts, layout: _Layout,
                 typed: bool) -> Converted:
    """Each table as a part of its own, in order, every part in the first one's schema
    (an empty source: one empty part, so the batch still has its columns)."""
    first = next(tables, None)
    if first is None:
        with target.open(0) as dst:
            pq.write_table(pa.table({}), dst)
        return Converted(pa.schema([]), 0)
    options = _typed_options(first.schema) if typed else {}
    rows = 0
    for number, table in enumerate(itertools.chain([first], tables)):
        with target.open(number) as dst:
            pq.write_table(_conform(table, first.schema, layout), dst, **options)
        rows += table.num_rows
    return Converted(first.schema, rows)


def _typed_options(schema: pa.Schema) -> dict[str, Any]:
    """Parquet encoding of typed rows: dictionary pages for the category columns only (a
    dictionary attempt on ids, amounts or times is wasted work: it overflows and falls
    back), LZ4 pages. Both halve the write and cut the read by a third on PaySim."""
    categories = [f.name for f in schema if pa.types.is_dictionary(f.type)]
    return {"use_dictionary": categories, "compression": "lz4"}


def _conform(table: pa.Table, schema: pa.Schema, layout: _Layout) -> pa.Table:
    if table.schema.equals(schema):
        return table
    if table.schema.names != schema.names:
        raise _Drift(_Layout(_union(schema.names, table.schema.names), layout.forced))
    try:
        return table.cast(schema)
    except _CAST_ERRORS:
        raise _Drift(_Layout(schema.names, _widened(schema, table.schema, layout))) from None


def _union(first: list[str], second: list[str]) -> list[str]:
    return first + [name for name in second if name not in first]


def _widened(schema: pa.Schema, chunk: pa.Schema, layout: _Layout) -> dict[str, pa.DataType]:
    forced = dict(layout.forced)
    for column in schema:
        other = chunk.field(column.name).type
        if other != column.type:
            forced[column.name] = wider(column.type, other)
    return forced


def wider(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """The narrowest type that holds values of both: null < int < float < string."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if _is_number(a) and _is_number(b):
        return pa.float64()
    return pa.string()


def _is_number(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind))


def _tables(src: IO[bytes], fmt: str, chunk_rows: int, layout: _Layout,
            typing: ChunkTyping | None) -> Iterator[pa.Table]:
    if typing is not None:
        yield from _typed_tables(src, fmt, chunk_rows, layout, typing)
    elif fmt == "parquet":
        for batch in pq.ParquetFile(src).iter_batches(batch_size=chunk_rows):
            yield pa.Table.from_batches([batch])
    else:
        for frame in _frames(src, fmt, chunk_rows, layout):
            yield _table(frame, layout)


def _typed_tables(src: IO[bytes], fmt: str, chunk_rows: int, layout: _Layout,
                  typing: ChunkTyping) -> Iterator[pa.Table]:
    """Each chunk through ``typing``, with the typed frame's pandas dtypes in the schema."""
    first_row = 0
    for frame in read_frames(src, fmt, chunk_rows, typing.text_columns, layout):
        typed = typing(frame.reset_index(drop=True), first_row)
        first_row += len(frame)
        table = _table(typed, layout)
        # The dtypes of an empty copy: columns of mixed Python objects cannot fail there.
        pandas = pa.Schema.from_pandas(typed.head(0), preserve_index=False).metadata
        yield table.replace_schema_metadata(pandas)


def read_frames(src: IO[bytes], fmt: str, chunk_rows: int, text_columns: Collection[str] = (),
                layout: _Layout | None = None) -> Iterator[pd.DataFrame]:
    """A source as pandas reads it, ``chunk_rows`` rows at a time (each chunk's types
    inferred on its own, but ``text_columns`` of a CSV as text)."""
    if fmt == "parquet":
        return (batch.to_pandas() for batch in pq.ParquetFile(src).iter_batches(chunk_rows))
    return _frames(src, fmt, chunk_rows, layout or _Layout(), text_columns)


def _frames(src: IO[bytes], fmt: str, chunk_rows: int, layout: _Layout,
            text_columns: Collection[str] = ()) -> Iterator[pd.DataFrame]:
    if fmt == "csv":
        text = {name: str for name, kind in layout.forced.items() if pa.types.is_string(kind)}
        text.update((name, str) for name in text_columns)
        return iter(pd.read_csv(src, chunksize=chunk_rows, dtype=text or None))
    # dtype=False keeps "007" a string; precise_float keeps every digit of a double.
    return iter(
        pd.read_json(
            src,
            lines=True,
            chunksize=chunk_rows,
            dtype=False,
            convert_dates=False,
            keep_default_dates=False,
            precise_float=True,
        )
    )


def _table(frame: pd.DataFrame, layout: _Layout) -> pa.Table:
    if layout.columns:
        frame = frame.reindex(columns=_union(layout.columns, [str(c) for c in frame.columns]))
    for name, kind in layout.forced.items():
        frame[name] = _force(frame[name], kind)
    table = _from_pandas(frame)
    return _cast_forced(table, layout.forced)


def _force(column: pd.Series, kind: pa.DataType) -> pd.Series:
    if pa.types.is_string(kind):
        return column.map(_as_text, na_action="ignore").astype(object)
    if pa.types.is_floating(kind):
        try:
            return pd.to_numeric(column).astype("float64")
        except (ValueError, TypeError):
            return column  # text in a number column: the cast check widens it to string
    return column


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def _from_pandas(frame: pd.DataFrame) -> pa.Table:
    arrays = [_column(frame[name]) for name in frame.columns]
    return pa.Table.from_arrays(arrays, names=[str(name) for name in frame.columns])


def _column(column: pd.Series) -> pa.Array:
    try:
        array = pa.array(column, from_pandas=True)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        # Mixed Python types in one column (JSON lines: 1 here, "a" there) are kept as text.
        array = pa.array(_force(column, pa.string()), from_pandas=True)
    # A chunk with no value in a column says nothing of its type: null fits any later one.
    return pa.nulls(len(array)) if len(array) and array.null_count == len(array) else array


def _cast_forced(table: pa.Table, forced: dict[str, pa.DataType]) -> pa.Table:
    for name, kind in forced.items():
        index = table.schema.get_field_index(name)
        # Still too narrow if the cast fails: the schema check then widens it, starts over.
        with suppress(*_CAST_ERRORS):
            table = table.set_column(index, name, table.column(index).cast(kind))
    return table
