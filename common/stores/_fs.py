"""A data root on any fsspec filesystem, with the few file operations the stores share.

Every file a store writes goes through ``atomic_open``: the bytes land under a temporary
name and are moved into place only once complete, so a crash never leaves a file that
looks whole but is not. On a local folder the move is an ``os.replace`` (atomic); on
object storage the final object appears in one PUT. Example::

    root = DataRoot("./var/data")              # or "s3://bucket/conveyor", "memory://x"
    with root.atomic_open("raw/abc/manifest.json") as f:
        f.write(b"{}")
    root.read_json("raw/abc/manifest.json")    # {}
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from typing import IO, Any
from uuid import uuid4

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from common.errors import InvalidInput

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
TMP_MARK = ".tmp-"


def check_id(kind: str, value: str) -> str:
    """``value`` if it is safe as one path segment, else ``InvalidInput`` naming it."""
    if not isinstance(value, str) or not _SAFE_ID.match(value) or ".." in value:
        raise InvalidInput(f"{kind} {value!r} is not a valid id (letters, digits, '._-')")
    return value


class RootedStore:
    """A store kept under one data root (its files through ``self._root``)."""

    def __init__(self, root: str):
        self._root = DataRoot(root)
        self._root_url = root

    @property
    def root(self) -> str:
        """The data root (a folder or fsspec URL), as given: what a worker opens it with."""
        return self._root_url


class DataRoot:
    """A folder or fsspec URL under which a store keeps its files (paths are relative)."""

    def __init__(self, root: str):
        self.fs: AbstractFileSystem
        self.fs, path = fsspec.core.url_to_fs(root)
        self.base = path.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        """Whether the root is a local folder (where os-level locks and renames apply)."""
        return isinstance(self.fs, LocalFileSystem)

    def path(self, relative: str) -> str:
        """The filesystem path of a path relative to the root."""
        return f"{self.base}/{relative}"

    def uri(self, relative: str) -> str:
        """A full URL (``file:///...``, ``s3://...``) of a path relative to the root."""
        return str(self.fs.unstrip_protocol(self.path(relative)))

    def exists(self, relative: str) -> bool:
        """Whether a file exists under the root."""
        return bool(self.fs.exists(self.path(relative)))

    def open(self, relative: str) -> IO[bytes]:
        """Open a file under the root for binary reading."""
        return self.fs.open(self.path(relative), "rb")  # type: ignore[no-any-return]

    def read_bytes(self, relative: str) -> bytes:
        """The content of a file under the root."""
        with self.open(relative) as handle:
            return handle.read()

    def read_json(self, relative: str) -> Any:
        """A JSON file under the root, decoded."""
        return json.loads(self.read_bytes(relative))

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole file atomically."""
        with self.atomic_open(relative) as handle:
            handle.write(data)

    def glob(self, pattern: str) -> list[str]:
        """Paths relative to the root that match a glob pattern, sorted."""
        prefix = len(self.base) + 1
        return sorted(str(p)[prefix:] for p in self.fs.glob(self.path(pattern)))

    def remove_tree(self, relative: str) -> None:
        """Delete a folder and everything in it, if it exists."""
        if self.exists(relative):
            self.fs.rm(self.path(relative), recursive=True)

    @contextmanager
    def atomic_open(self, relative: str) -> Iterator[IO[bytes]]:
        """A binary file handle whose content appears at ``relative`` only on success."""
        final = self.path(relative)
        temp = f"{final}{TMP_MARK}{uuid4().hex}"
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        try:
            with self.fs.open(temp, "wb") as handle:
                yield handle
                _sync(handle)
            self.fs.mv(temp, final)
        except BaseException:
            _discard(self.fs, temp)
            raise

    def lock(self, relative: str) -> Any:
        """An exclusive cross-process lock on a local root; a no-op on object storage.

        Object storage has no lock here: such a root must have a single writer.
        """
        return _flock(self.path(relative)) if self.is_local else nullcontext()


@contextmanager
def _flock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _sync(handle: IO[bytes]) -> None:
    # Durable before the rename: a service acks a message only after its work is on disk.
    try:
        handle.flush()
        os.fsync(handle.fileno())
    except (AttributeError, OSError, ValueError):
        pass  # not a local file: the object store makes it durable on close


def _discard(fs: AbstractFileSystem, temp: str) -> None:
    with suppress(OSError):  # FileNotFoundError included: nothing to clean up
        fs.rm(temp)
