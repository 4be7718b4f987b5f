"""Which sources ingestion may read: allowed schemes and roots, checked before a byte is read.

A ``SourceDataAvailable.uri`` is chosen by whoever can publish the event. Handed to fsspec
as is, it would read ``/proc/self/environ`` (the environment holds the signing key) or
``/etc/passwd`` into the raw store, and ``ftp://`` or any installed fsspec backend would
reach other hosts. ``SourcePolicy.check`` allows a URI only if:

- it is one URL: fsspec chaining (``simplecache::file:///etc/passwd``) is refused, as the
  inner URL would escape the checks on the outer one;
- its scheme is allowed (``CONVEYOR_SOURCE_SCHEMES``; default ``file`` only);
- a local file's real path (symlinks resolved, ``..`` collapsed) lies inside an allowed
  root (``CONVEYOR_SOURCE_ROOTS``, resolved the same way; the data root's ``inbox/`` is
  always one); a remote URL's normalised path starts with an allowed root of its scheme.

Anything else raises ``SourceRefused`` (an ``InvalidInput``, so ingestion answers
IngestionFailed) naming the URI and the rule. ``check`` returns what to read: for a local
file its real path, so a symlink swapped after the check is not followed. Example::

    policy = SourcePolicy.from_settings(settings)
    path = policy.check("/srv/conveyor/inbox/tx.csv")   # "/srv/conveyor/inbox/tx.csv"
    policy.check("/etc/passwd")                          # SourceRefused: outside the roots
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from fsspec.core import split_protocol

from common.errors import InvalidInput
from common.settings import Settings

LOCAL_SCHEMES = frozenset({"file", "local"})
"""fsspec's names of the local filesystem; both mean ``file`` here."""
INBOX = "inbox"
"""The folder of the data root that is always an allowed source root."""


class SourceRefused(InvalidInput):
    """A source URI that the source policy does not allow: nothing of it is read."""

    def __init__(self, uri: str, rule: str):
        self.uri, self.rule = uri, rule
        super().__init__(f"source {uri!r} refused: {rule}")


@dataclass(frozen=True)
class SourcePolicy:
    """The schemes and roots sources may come from."""

    schemes: frozenset[str]
    local_roots: tuple[str, ...]
    remote_roots: tuple[str, ...]

    @classmethod
    def of(cls, schemes: Iterable[str], roots: Iterable[str]) -> SourcePolicy:
        """A policy of these schemes and roots (folders, or URL prefixes of a scheme)."""
        local: list[str] = []
        remote: list[str] = []
        for root in roots:
            scheme, path = _split(root)
            if scheme == "file":
                local.append(os.path.realpath(path))
            else:
                remote.append(f"{scheme}://{posixpath.normpath(path).rstrip('/')}")
        return cls(frozenset(_scheme_name(s) for s in schemes), tuple(local), tuple(remote))

    @classmethod
    def from_settings(cls, settings: Settings) -> SourcePolicy:
        """The policy of ``CONVEYOR_SOURCE_SCHEMES`` and ``CONVEYOR_SOURCE_ROOTS`` plus the
        data root's inbox."""
        inbox = f"{settings.data_root.rstrip('/')}/{INBOX}"
        return cls.of(settings.source_schemes, [*settings.source_roots, inbox])

    def check(self, uri: str) -> str:
        """What to read for ``uri`` (a local file's real path), or ``SourceRefused``."""
        if "::" in uri:
            raise SourceRefused(uri, "chained fsspec URLs ('::') are not allowed")
        scheme, path = _split(uri)
        if scheme not in self.schemes:
            allowed = ", ".join(sorted(self.schemes)) or "none"
            raise SourceRefused(uri, f"scheme {scheme!r} is not allowed (allowed: {allowed}; "
                                "setting CONVEYOR_SOURCE_SCHEMES)")
        if scheme == "file":
            return self._local(uri, path)
        return self._remote(uri, f"{scheme}://{posixpath.normpath(path)}")

    def _local(self, uri: str, path: str) -> str:
        real = os.path.realpath(path)
        if not any(_inside(real, root) for root in self.local_roots):
            raise SourceRefused(uri, f"its real path {real} is outside the allowed roots "
                                f"({_listed(self.local_roots)}; setting CONVEYOR_SOURCE_ROOTS)")
        return real

    def _remote(self, uri: str, normalised: str) -> str:
        if not any(_inside(normalised, root) for root in self.remote_roots):
            raise SourceRefused(uri, f"{normalised} is outside the allowed roots "
                                f"({_listed(self.remote_roots)}; setting CONVEYOR_SOURCE_ROOTS)")
        return normalised


def _split(uri: str) -> tuple[str, str]:
    """(scheme, path) of a URI; a bare path is a local file."""
    scheme, path = split_protocol(uri)
    return _scheme_name(scheme or "file"), path


def _scheme_name(scheme: str) -> str:
    lowered = scheme.lower()
    return "file" if lowered in LOCAL_SCHEMES else lowered


def _inside(path: str, root: str) -> bool:
    # A plain prefix test would let /srv/inbox-evil pass for the root /srv/inbox.
    return path == root or path.startswith(root.rstrip("/") + "/")


def _listed(roots: tuple[str, ...]) -> str:
    return ", ".join(roots) or "none configured"
