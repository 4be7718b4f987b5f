"""Raw batch store on a temporary folder (and on fsspec's in-memory filesystem)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from uuid import uuid4

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import common.stores.raw as raw_module
from common.errors import ImmutableBatchError, InvalidInput, NotFound
from common.stores import KeepAsRead
from common.stores.raw import BATCH_ID_HEX, RawBatchStore, infer_format


def write_csv(path: Path, rows: int = 100) -> Path:
    """A CSV whose late rows change the inferred types: a missing int, then text."""
    lines = ["id,amount,kind,note"]
    for i in range(rows):
        amount = "" if i == rows - 10 else str(i * 3)
        kind = "TRANSFER" if i % 2 else "CASH_OUT"
        note = str(i) if i < rows - 5 else f"n{i}"
        lines.append(f"{i},{amount},{kind},{note}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def store(tmp_path: Path) -> RawBatchStore:
    return RawBatchStore(str(tmp_path / "root"), chunk_rows=7)


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "tx.csv")


def test_batch_id_is_a_prefix_of_the_sha256_of_the_bytes(store, csv_file):
    batch = store.put("paysim", str(csv_file))
    digest = hashlib.sha256(csv_file.read_bytes()).hexdigest()
    assert batch.batch_id == digest[:BATCH_ID_HEX]
    assert batch.sha256 == digest
    assert batch.size_bytes == csv_file.stat().st_size


def test_same_bytes_give_the_same_batch_without_rewriting(store, csv_file, tmp_path, monkeypatch):
    first = store.put("paysim", str(csv_file))
    parquet = tmp_path / "root" / first.paths["parquet"]
    stamp = parquet.stat().st_mtime_ns
    copy = tmp_path / "again.csv"
    copy.write_bytes(csv_file.read_bytes())
    monkeypatch.setattr(raw_module, "to_parquet", _must_not_convert)
    second = store.put("paysim", str(copy))
    assert second == first
    assert parquet.stat().st_mtime_ns == stamp


def _must_not_convert(*args, **kwargs):
    raise AssertionError("a stored batch was converted again")


def test_different_bytes_give_a_different_batch(store, csv_file, tmp_path):
    other = write_csv(tmp_path / "other.csv", rows=101)
    assert store.put("paysim", str(csv_file)).batch_id != store.put("paysim", str(other)).batch_id


def test_same_bytes_for_another_dataset_are_refused(store, csv_file):
    store.put("paysim", str(csv_file))
    with pytest.raises(ImmutableBatchError, match="paysim"):
        store.put("other", str(csv_file))


def test_manifest_describes_the_batch(store, csv_file, tmp_path):
    batch = store.put("paysim", str(csv_file))
    assert store.manifest(batch.batch_id) == batch
    assert batch.rows == 100
    assert batch.columns == {"id": "int64", "amount": "int64", "kind": "string", "note": "string"}
    assert batch.format == "csv" and batch.dataset == "paysim"
    assert (tmp_path / "root" / batch.paths["original"]).read_bytes() == csv_file.read_bytes()
    on_disk = json.loads((tmp_path / "root" / batch.paths["manifest"]).read_text())
    assert on_disk["batch_id"] == batch.batch_id


@pytest.mark.parametrize("chunk_rows", [1, 7, 99, 100_000])
def test_chunked_conversion_gives_the_whole_file_frame(tmp_path, csv_file, chunk_rows):
    store = RawBatchStore(str(tmp_path / f"root{chunk_rows}"), chunk_rows=chunk_rows)
    batch = store.put("paysim", str(csv_file))
    expected = pd.read_csv(csv_file)
    pd.testing.assert_frame_equal(store.read_frame(batch.batch_id), expected)


def test_iter_frames_yields_bounded_chunks_of_the_same_data(store, csv_file):
    batch = store.put("paysim", str(csv_file))
    chunks = list(store.iter_frames(batch.batch_id, rows=30))
    assert [len(c) for c in chunks] == [30, 30, 30, 10]
    whole = pd.concat(chunks, ignore_index=True)
    pd.testing.assert_frame_equal(whole, store.read_frame(batch.batch_id))


def test_read_frame_of_some_columns(store, csv_file):
    batch = store.put("paysim", str(csv_file))
    assert list(store.read_frame(batch.batch_id, columns=["kind"]).columns) == ["kind"]


def test_jsonl_lines_with_new_keys_and_mixed_types(store, tmp_path):
    source = tmp_path / "events.ndjson"
    lines = [{"a": 1, "b": "007"}, {"a": 2, "c": True}, {"a": "x"}, {"a": None, "b": "8"}] * 3
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    batch = store.put("events", str(source))
    frame = store.read_frame(batch.batch_id)
    assert batch.format == "jsonl" and batch.rows == 12
    assert list(frame.columns) == ["a", "b", "c"]
    assert frame["a"].tolist()[:4] == ["1", "2", "x", None]
    assert frame["b"].tolist()[:4] == ["007", None, None, "8"]


def test_parquet_source_with_several_row_groups(store, tmp_path):
    source = tmp_path / "part.parquet"
    frame = pd.DataFrame({"x": np.arange(50), "y": np.linspace(0, 1, 50)})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), source, row_group_size=8)
    batch = store.put("parts", str(source))
    assert batch.format == "parquet" and batch.rows == 50
    pd.testing.assert_frame_equal(store.read_frame(batch.batch_id), frame)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tx.csv", "csv"),
        ("TX.CSV", "csv"),
        ("file:///data/tx.parquet", "parquet"),
        ("s3://bucket/x.pq", "parquet"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
    ],
)
def test_format_is_inferred_from_the_name(name, expected):
    assert infer_format(name) == expected


def test_named_format_wins_over_the_name():
    assert infer_format("export.txt", "csv") == "csv"
    assert infer_format("export.txt", "ndjson") == "jsonl"


def test_unknown_suffix_is_invalid_input_naming_the_file(store, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("a,b\n1,2\n")
    with pytest.raises(InvalidInput, match="notes.txt"):
        store.put("x", str(source))


def test_unknown_named_format_is_invalid_input_naming_the_file(store, csv_file):
    with pytest.raises(InvalidInput, match=r"'xml'.*tx\.csv|tx\.csv.*'xml'"):
        store.put("x", str(csv_file), "xml")


def test_missing_file_is_not_found_naming_the_file(store, tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(NotFound, match="nope.csv") as caught:
        store.put("x", str(missing))
    assert caught.value.kind == "source file"


def test_unreadable_source_is_invalid_input_and_leaves_nothing(store, tmp_path):
    source = tmp_path / "broken.parquet"
    source.write_bytes(b"this is not parquet at all")
    with pytest.raises(InvalidInput, match="broken.parquet"):
        store.put("x", str(source))
    assert store.list() == []
    assert not (tmp_path / "root" / "raw").exists() or not any(
        (tmp_path / "root" / "raw").iterdir()
    )


def test_empty_csv_is_invalid_input(store, tmp_path):
    source = tmp_path / "empty.csv"
    source.write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty.csv"):
        store.put("x", str(source))


def test_a_crash_before_the_manifest_leaves_no_complete_batch(store, csv_file, monkeypatch):
    digest = hashlib.sha256(csv_file.read_bytes()).hexdigest()[:BATCH_ID_HEX]
    monkeypatch.setattr(raw_module, "to_parquet", _crash)
    with pytest.raises(RuntimeError):
        store.put("paysim", str(csv_file))
    assert not store.exists(digest)
    with pytest.raises(NotFound):
        store.manifest(digest)
    monkeypatch.undo()
    assert store.put("paysim", str(csv_file)).rows == 100


def _crash(*args, **kwargs):
    raise RuntimeError("killed mid-write")


def test_no_temporary_file_is_left_behind(store, csv_file, tmp_path):
    store.put("paysim", str(csv_file))
    leftovers = [p for p in (tmp_path / "root").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_list_filters_by_dataset(store, csv_file, tmp_path):
    first = store.put("paysim", str(csv_file))
    second = store.put("wine", str(write_csv(tmp_path / "w.csv", rows=20)))
    assert {b.batch_id for b in store.list()} == {first.batch_id, second.batch_id}
    assert [b.batch_id for b in store.list("wine")] == [second.batch_id]


def test_unknown_or_malformed_batch_id_is_not_found(store):
    for batch_id in ("0" * BATCH_ID_HEX, "../../etc", ""):
        assert not store.exists(batch_id)
        with pytest.raises(NotFound):
            store.read_frame(batch_id)


def test_any_fsspec_root_works(csv_file):
    root = f"memory://conveyor-{uuid4().hex}"
    batch = RawBatchStore(root, chunk_rows=10).put("paysim", str(csv_file))
    again = RawBatchStore(root)
    assert again.manifest(batch.batch_id) == batch
    assert again.list() == [batch]
    pd.testing.assert_frame_equal(again.read_frame(batch.batch_id), pd.read_csv(csv_file))


# -- typing while storing (ingestion's contract check) -----------------------------------


class KindTyping:
    """A ChunkTyping for these tests: ``kind`` as a category, rows of ``drop`` set aside,
    the source refused (kept as read) from row ``refuse_from`` or at the end."""

    name = "kind-v1"

    def __init__(self, drop: tuple[int, ...] = (), refuse_from: int | None = None,
                 refuse_at_finish: bool = False, text_columns: tuple[str, ...] = ("note",),
                 ) -> None:
        self.drop, self.refuse_from, self.refuse_at_finish = drop, refuse_from, refuse_at_finish
        self.text_columns = text_columns
        self.starts, self.rows, self.first_rows = 0, 0, []

    def start(self) -> None:
        self.starts, self.rows, self.first_rows = self.starts + 1, 0, []

    def __call__(self, chunk: pd.DataFrame, first_row: int) -> pd.DataFrame:
        self.first_rows.append(first_row)
        self.rows += len(chunk)
        if self.refuse_from is not None and first_row + len(chunk) > self.refuse_from:
            raise KeepAsRead
        kept = [i for i in range(len(chunk)) if first_row + i not in self.drop]
        return chunk.iloc[kept].astype({"kind": "category", "id": "Int64"})

    def finish(self) -> int:
        if self.refuse_at_finish:
            raise KeepAsRead
        return len(self.drop)


def test_a_typing_types_each_chunk_as_it_is_stored(store, csv_file):
    typing = KindTyping()
    batch = store.put("paysim", str(csv_file), typing=typing)
    assert batch.typed_by == "kind-v1" and batch.rows_set_aside == 0 and batch.rows == 100
    assert typing.first_rows == list(range(0, 100, 7))  # rows counted across chunks
    frame = store.read_frame(batch.batch_id)
    assert str(frame["kind"].dtype) == "category" and str(frame["id"].dtype) == "Int64"
    expected = pd.read_csv(csv_file).astype({"kind": "category", "id": "Int64"})
    assert frame["kind"].tolist() == expected["kind"].tolist()
    assert frame["id"].tolist() == expected["id"].tolist()
    assert frame["note"].tolist()[:2] == ["0", "1"]  # text columns are read as text
    assert {str(c["id"].dtype) for c in store.iter_frames(batch.batch_id, rows=30)} == {"Int64"}
    original = Path(store.original_uri(batch.batch_id).removeprefix("file://"))
    assert original.read_bytes() == csv_file.read_bytes()  # the bytes stay as they came


def test_a_conversion_that_starts_over_starts_the_typing_over(store, csv_file):
    typing = KindTyping(text_columns=())  # late text in "note": the conversion restarts
    store.put("paysim", str(csv_file), typing=typing)
    assert typing.starts > 1 and typing.rows == 100


def test_rows_a_typing_sets_aside_are_not_stored_but_counted(store, csv_file):
    batch = store.put("paysim", str(csv_file), typing=KindTyping(drop=(3, 50, 99)))
    assert batch.rows == 97 and batch.rows_set_aside == 3
    assert 50 not in store.read_frame(batch.batch_id)["id"].tolist()


@pytest.mark.parametrize("typing", [KindTyping(refuse_from=40), KindTyping(refuse_at_finish=True)],
                         ids=["in a chunk", "at the end"])
def test_a_source_the_typing_refuses_is_stored_as_read(store, csv_file, typing):
    batch = store.put("paysim", str(csv_file), typing=typing)
    assert batch.typed_by is None and batch.rows == 100 and batch.rows_set_aside == 0
    pd.testing.assert_frame_equal(store.read_frame(batch.batch_id), pd.read_csv(csv_file))


def test_a_source_that_changes_while_it_is_stored_is_refused(store, csv_file, monkeypatch):
    real = raw_module._digest
    # The digest (the batch id) was taken from other bytes than the ones read afterwards.
    monkeypatch.setattr(raw_module, "_digest", lambda fs, path: ("0" * 64, real(fs, path)[1]))
    with pytest.raises(InvalidInput, match=r"tx\.csv changed while it was being stored"):
        store.put("paysim", str(csv_file), typing=KindTyping())
    assert store.list() == []
