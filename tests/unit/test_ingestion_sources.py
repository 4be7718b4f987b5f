"""The source policy: only allowed schemes, only real paths inside allowed roots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.events import IngestionFailed, SourceDataAvailable
from common.settings import Settings
from common.stores import RawBatchStore
from ingestion.service import IngestionService
from ingestion.sources import SourcePolicy, SourceRefused
from tests.fixtures.pipeline import parsed, paysim_config, write_paysim


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture
def policy(inbox: Path) -> SourcePolicy:
    return SourcePolicy.of(["file"], [str(inbox)])


def test_a_file_inside_a_root_is_read_by_its_real_path(policy: SourcePolicy, inbox: Path) -> None:
    source = inbox / "tx.csv"
    source.write_text("a\n1\n")
    assert policy.check(str(source)) == os.path.realpath(source)
    assert policy.check(f"file://{source}") == os.path.realpath(source)


@pytest.mark.parametrize("uri", ["/etc/passwd", "/proc/self/environ", "file:///etc/passwd",
                                 "local:///etc/passwd"])
def test_system_files_are_outside_every_root(policy: SourcePolicy, uri: str) -> None:
    with pytest.raises(SourceRefused, match="is outside the allowed roots") as refused:
        policy.check(uri)
    assert refused.value.uri == uri and uri in str(refused.value)
    assert "CONVEYOR_SOURCE_ROOTS" in str(refused.value)


def test_dot_dot_escapes_are_resolved_before_the_check(policy: SourcePolicy, inbox: Path) -> None:
    escape = f"{inbox}/../../../../../etc/passwd"
    with pytest.raises(SourceRefused, match="real path /etc/passwd is outside"):
        policy.check(escape)


def test_a_sibling_folder_sharing_the_roots_prefix_is_outside(
    policy: SourcePolicy, inbox: Path
) -> None:
    sibling = inbox.parent / "inbox-evil"
    sibling.mkdir()
    (sibling / "tx.csv").write_text("a\n1\n")
    with pytest.raises(SourceRefused, match="outside the allowed roots"):
        policy.check(str(sibling / "tx.csv"))


def test_a_symlink_out_of_a_root_is_refused(policy: SourcePolicy, inbox: Path,
                                            tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("key\nhunter2\n")
    (inbox / "innocent.csv").symlink_to(secret)
    (inbox / "dir").symlink_to(tmp_path)
    for uri in (inbox / "innocent.csv", inbox / "dir" / "secret.csv"):
        with pytest.raises(SourceRefused, match=f"real path {secret} is outside"):
            policy.check(str(uri))


@pytest.mark.parametrize("uri", ["ftp://example.com/tx.csv", "http://169.254.169.254/latest",
                                 "zip://tx.csv", "memory://tx.csv", "s3://bucket/tx.csv"])
def test_other_schemes_are_refused(policy: SourcePolicy, uri: str) -> None:
    scheme = uri.split(":", 1)[0]
    with pytest.raises(SourceRefused, match=f"scheme '{scheme}' is not allowed .allowed: file"):
        policy.check(uri)


@pytest.mark.parametrize("uri", ["simplecache::file:///etc/passwd",
                                 "zip://passwd::file:///tmp/x.zip",
                                 "filecache::ftp://example.com/tx.csv"])
def test_chained_fsspec_urls_are_refused(policy: SourcePolicy, uri: str) -> None:
    with pytest.raises(SourceRefused, match="chained fsspec URLs"):
        policy.check(uri)


def test_a_remote_scheme_is_allowed_under_its_own_roots_only() -> None:
    policy = SourcePolicy.of(["file", "s3"], ["s3://bucket/inbox"])
    assert policy.check("s3://bucket/inbox/day/tx.csv") == "s3://bucket/inbox/day/tx.csv"
    for uri in ("s3://bucket/inbox/../secrets/key", "s3://other/inbox/tx.csv",
                "s3://bucket/inbox-evil/tx.csv"):
        with pytest.raises(SourceRefused, match="outside the allowed roots"):
            policy.check(uri)
    with pytest.raises(SourceRefused, match="outside the allowed roots .none configured"):
        policy.check("/etc/passwd")


def test_the_default_roots_are_the_data_roots_inbox_and_the_demo_folder(tmp_path: Path) -> None:
    settings = Settings(data_root=str(tmp_path / "data"), source_roots=("var/demo",),
                        source_schemes=("file",))
    policy = SourcePolicy.from_settings(settings)
    assert policy.local_roots == (os.path.realpath("var/demo"),
                                  os.path.realpath(tmp_path / "data" / "inbox"))
    assert Settings.model_fields["source_roots"].default == ("var/demo",)
    assert Settings.model_fields["source_schemes"].default == ("file",)


def test_ingestion_answers_a_refused_source_with_ingestion_failed_and_copies_nothing(
    tmp_path: Path, inbox: Path, policy: SourcePolicy
) -> None:
    raw = RawBatchStore(str(tmp_path / "data"))
    service = IngestionService(parsed(paysim_config()), raw, policy)
    outside = write_paysim(tmp_path / "outside.csv", 50, seed=1)
    for uri in (str(outside), "/proc/self/environ", "simplecache::file:///etc/passwd"):
        event = SourceDataAvailable(dataset="paysim", uri=uri, producer="test")
        answer = service.on_source_data_available(event)
        assert isinstance(answer, IngestionFailed), uri
        assert answer.uri == uri and f"source {uri!r} refused" in answer.reason
    assert raw.list() == [] and not (tmp_path / "data" / "raw").exists()
    inside = write_paysim(inbox / "tx.csv", 50, seed=1)
    event = SourceDataAvailable(dataset="paysim", uri=str(inside), producer="test")
    assert service.on_source_data_available(event).event_type == "RawDataExtracted"
