"""Model store (signed artifacts and their metadata) and model registry (versions, aliases).

``ModelStore`` keeps ``models/<model_id>/`` under the data root: ``model.signed`` (a
header line with the signature, then the model serialised with dill: the two are one file,
written atomically together) and a metadata JSON written last. The HMAC-SHA256 signature
(``common.signing``) covers the store's context (model or feature pipeline), the model id,
the artifact's SHA-256 and the metadata that decides how the model is used
(``BOUND_METADATA``: its feature set id and feature order), and names the id of the key
that made it. ``load`` refuses, before dill ever sees the bytes, an artifact that was
changed, has no signature, was signed by an unknown key or in another context, was copied
under another model's id, or whose record now says another feature set or feature order.
Any key of the keyring verifies, so keys rotate without re-signing. Model ids are derived
from their content, so saving an id that is already stored returns the stored record.

``ModelRegistry`` is one JSON document per registry name under ``registry/``: versions
(``v1``, ``v2``, ... in registration order), the serving chain (champion, previous, older)
and a history of who promoted or demoted what, when and why. Every change is a
read-modify-write under an exclusive ``fcntl`` lock, written to a temporary file and moved
into place with ``os.replace``, so concurrent processes on one machine never lose an
update. An object-storage root has no such lock: give it a single writer. Example::

    store = ModelStore(settings.data_root, Keyring.from_settings(settings))  # or a bytes key
    store.save("m-3f2a", model, {"algorithm": "xgboost", "feature_set_id": "fs1"})
    model = store.load("m-3f2a")          # ArtifactSignatureError if tampered or unsigned

    registry = ModelRegistry(settings.data_root)
    registry.promote("m-3f2a", reason="auc 0.91 > 0.89")     # -> "v1", now the champion
    registry.demote(reason="latency p99 over budget")         # champion <- previous
    registry.revert("v2", reason="accuracy 0.41 < 0.97")      # the same, only if v2 leads
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar, get_args

import dill
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from common.errors import ArtifactSignatureError, InvalidInput, ModelIdNotFound, ModelNotFound
from common.events import utc_now
from common.settings import Settings
from common.signing import MODEL, Keyring
from common.stores._fs import DataRoot, check_id

ModelStatus = Literal["candidate", "champion", "previous", "rejected"]
T = TypeVar("T")
SIGNED_MAGIC = b"CONVEYOR-SIGNED/2\n"
"""First line of a signed artifact; the header (JSON) is the second, the payload follows."""
BOUND_METADATA = ("feature_set_id", "features")
"""Metadata keys that decide how a model is used: signed with it, never changed after."""


class SignatureHeader(BaseModel):
    """The signature line of a signed artifact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    context: str
    key_id: str
    signature: str
    sha256: str
    bound: dict[str, Any]


def signed_message(model_id: str, sha256: str, bound: dict[str, Any]) -> bytes:
    """What a signature covers (besides its context): the id, the artifact's digest and
    the bound metadata, canonically encoded."""
    canonical = json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()
    return b"\x00".join((model_id.encode(), sha256.encode(), canonical))


def bound_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The part of a model's metadata its signature covers."""
    return {key: metadata[key] for key in BOUND_METADATA if key in metadata}


def default_actor() -> str:
    """Who acts when nobody is named: this host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class ModelRecord(BaseModel):
    """A stored model's metadata; the free-form part is ``metadata``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str
    status: ModelStatus = "candidate"
    created_at: AwareDatetime
    updated_at: AwareDatetime
    artifact_sha256: str
    artifact_bytes: int = Field(ge=0)
    signature: Literal["hmac-sha256"] = "hmac-sha256"
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="algorithm, params, feature_set_id, batch ids, metrics, timings, ...",
    )


class ModelStore:
    """Signed artifacts of one context (models, or feature pipelines) under a data root."""

    def __init__(self, root: str, keys: Keyring | bytes, *, context: str = MODEL):
        if isinstance(keys, bytes):
            if not keys:
                raise InvalidInput("the model signing key is empty")
            keys = Keyring.single(keys)
        self._root = DataRoot(root)
        self._keys, self.context = keys, context

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelStore:
        """The model store under ``settings.data_root`` with the settings' keys (refused
        outside local development when the signing key is weak: ``WeakSigningKey``)."""
        return cls(settings.data_root, Keyring.from_settings(settings))

    def save(
        self, model_id: str, model: Any, metadata: dict[str, Any] | None = None
    ) -> ModelRecord:
        """Store a model signed; an id already stored returns its record unchanged.

        A ``status`` key in ``metadata`` sets the record's status (default candidate).
        """
        if self.exists(model_id):
            return self.metadata(model_id)
        payload = dill.dumps(model)
        record = _new_record(model_id, payload, dict(metadata or {}))
        header = self._header(model_id, record.artifact_sha256, bound_metadata(record.metadata))
        signed = SIGNED_MAGIC + header.model_dump_json().encode() + b"\n" + payload
        self._root.write_bytes(_artifact(model_id), signed)  # signature and bytes: one file
        return self._write_record(record)  # last: the record marks the model complete

    def load(self, model_id: str) -> Any:
        """The model, after its signature and bound metadata are verified;
        ``ArtifactSignatureError`` if not."""
        header, payload = self._verified(model_id)
        record = self.metadata(model_id)
        for key in sorted(set(header.bound) | set(bound_metadata(record.metadata))):
            if record.metadata.get(key) != header.bound.get(key):
                raise ArtifactSignatureError(
                    model_id, f"its metadata {key} is not the one key {header.key_id!r} signed")
        return dill.loads(payload)

    def metadata(self, model_id: str) -> ModelRecord:
        """The model's record, or ``ModelIdNotFound``."""
        if not self.exists(model_id):
            raise ModelIdNotFound(model_id)
        return ModelRecord.model_validate_json(self._root.read_bytes(_record(model_id)))

    def update_metadata(self, model_id: str, **changes: Any) -> ModelRecord:
        """Change the status (``status=...``) and merge other keys into ``metadata``."""
        if not self.exists(model_id):
            raise ModelIdNotFound(model_id)
        with self._root.lock(f"models/{model_id}/.lock"):
            record = self.metadata(model_id)
            _check_unbound(record, changes)
            return self._write_record(_changed(record, changes))

    def exists(self, model_id: str) -> bool:
        """Whether a complete model with this id is stored."""
        return self._root.exists(_record(check_id("model id", model_id)))

    def list(self) -> builtins.list[ModelRecord]:
        """Every stored model's record, oldest first."""
        records = [
            ModelRecord.model_validate_json(self._root.read_bytes(path))
            for path in self._root.glob("models/*/metadata.json")
        ]
        return sorted(records, key=lambda r: (r.created_at, r.model_id))

    def _header(self, model_id: str, sha256: str, bound: dict[str, Any]) -> SignatureHeader:
        key_id, signature = self._keys.sign(self.context, signed_message(model_id, sha256, bound))
        return SignatureHeader(context=self.context, key_id=key_id, signature=signature,
                               sha256=sha256, bound=bound)

    def _verified(self, model_id: str) -> tuple[SignatureHeader, bytes]:
        """The header and payload of an artifact whose signature verifies."""
        if not self._root.exists(_artifact(check_id("model id", model_id))):
            raise ModelIdNotFound(model_id)
        header, payload = _unpacked(model_id, self._root.read_bytes(_artifact(model_id)))
        if header.context != self.context:
            raise ArtifactSignatureError(
                model_id, f"signed as a {header.context}, not a {self.context}")
        if header.key_id not in self._keys.keys:
            known = ", ".join(sorted(self._keys.keys))
            raise ArtifactSignatureError(
                model_id, f"signed with unknown key id {header.key_id!r} (known: {known})")
        message = signed_message(model_id, hashlib.sha256(payload).hexdigest(), header.bound)
        if not self._keys.verify(self.context, message, header.key_id, header.signature):
            raise ArtifactSignatureError(
                model_id, f"signature does not verify with key {header.key_id!r}")
        return header, payload

    def _write_record(self, record: ModelRecord) -> ModelRecord:
        self._root.write_bytes(_record(record.model_id), record.model_dump_json(indent=2).encode())
        return record


def _new_record(model_id: str, payload: bytes, metadata: dict[str, Any]) -> ModelRecord:
    now = utc_now()
    return ModelRecord(
        model_id=model_id,
        status=_status(metadata.pop("status", "candidate")),
        created_at=now,
        updated_at=now,
        artifact_sha256=hashlib.sha256(payload).hexdigest(),
        artifact_bytes=len(payload),
        metadata=metadata,
    )


def _unpacked(model_id: str, data: bytes) -> tuple[SignatureHeader, bytes]:
    """The header and payload of a signed artifact; ``ArtifactSignatureError`` without."""
    if not data.startswith(SIGNED_MAGIC):
        raise ArtifactSignatureError(model_id, "no signature")
    line, sep, payload = data[len(SIGNED_MAGIC):].partition(b"\n")
    try:
        return SignatureHeader.model_validate_json(line), payload
    except ValueError:
        raise ArtifactSignatureError(model_id, "unreadable signature header") from None


def _check_unbound(record: ModelRecord, changes: dict[str, Any]) -> None:
    for key in BOUND_METADATA:
        if key in changes and changes[key] != record.metadata.get(key):
            raise InvalidInput(f"{key} of model {record.model_id} is signed: it cannot change")


def _changed(record: ModelRecord, changes: dict[str, Any]) -> ModelRecord:
    status = _status(changes.pop("status", record.status))
    return record.model_copy(
        update={"status": status, "updated_at": utc_now(), "metadata": record.metadata | changes}
    )


def _status(status: Any) -> ModelStatus:
    if status not in get_args(ModelStatus):
        known = ", ".join(get_args(ModelStatus))
        raise InvalidInput(f"unknown model status {status!r} (known: {known})")
    return status  # type: ignore[no-any-return]


def _artifact(model_id: str) -> str:
    return f"models/{model_id}/model.signed"


def _record(model_id: str) -> str:
    return f"models/{model_id}/metadata.json"


class RegistryEntry(BaseModel):
    """A registered version and the model it names."""

    model_config = ConfigDict(frozen=True)

    version: str
    model_id: str


class HistoryEntry(BaseModel):
    """One change of the registry: who did what, when, from which version to which, why."""

    model_config = ConfigDict(frozen=True)

    at: AwareDatetime
    by: str
    action: Literal["register", "promote", "demote"]
    model_id: str
    from_version: str | None = None
    to_version: str | None = None
    reason: str = ""


class RegistryState(BaseModel):
    """The registry document."""

    name: str
    versions: dict[str, str] = Field(default_factory=dict, description="version -> model id")
    chain: list[str] = Field(default_factory=list, description="served versions, champion last")
    history: list[HistoryEntry] = Field(default_factory=list)
    revision: int = 0


class ModelRegistry:
    """Versions and the champion/previous aliases of one model name, in one JSON file."""

    def __init__(self, root: str, name: str = "default"):
        self._root = DataRoot(root)
        self.name = check_id("registry name", name)
        self._path = f"registry/{name}.json"

    def register(self, model_id: str, *, by: str | None = None) -> str:
        """The model's version, assigned now (``v<n+1>``) if it has none yet."""
        return self._update(lambda state: _register(state, model_id, by or default_actor()))

    def promote(
        self,
        model_id: str | None = None,
        *,
        version: str | None = None,
        reason: str = "",
        by: str | None = None,
    ) -> str:
        """Make a model (by id, or by version) the champion; the old one becomes previous.

        Promoting the current champion changes nothing. Returns the champion's version.
        """
        actor = by or default_actor()
        return self._update(lambda state: _promote(state, model_id, version, reason, actor))

    def demote(self, *, reason: str = "", by: str | None = None) -> str:
        """Put the previous model back as champion; returns its version."""
        return self._update(lambda state: _demote(state, reason, by or default_actor()))

    def revert(self, version: str, *, reason: str = "", by: str | None = None) -> str:
        """Demote ``version`` if it is the champion (the previous one serves again);
        otherwise change nothing, so asking twice reverts once. Returns the champion."""
        return self._update(lambda state: _revert(state, version, reason, by or default_actor()))

    def champion(self) -> RegistryEntry:
        """The serving version, or ``ModelNotFound``."""
        return self._alias(1, "champion")

    def previous(self) -> RegistryEntry:
        """The version served before the champion, or ``ModelNotFound``."""
        return self._alias(2, "previous")

    def chain(self) -> builtins.list[RegistryEntry]:
        """The fallback chain: champion first, then previous, then older."""
        state = self._load()
        return [RegistryEntry(version=v, model_id=state.versions[v]) for v in reversed(state.chain)]

    def history(self) -> builtins.list[HistoryEntry]:
        """Every registration, promotion and demotion, oldest first."""
        return self._load().history

    def version_of(self, model_id: str) -> str:
        """The version of a registered model, or ``ModelIdNotFound``."""
        for version, known in self._load().versions.items():
            if known == model_id:
                return version
        raise ModelIdNotFound(model_id)

    def model_id_of(self, version: str) -> str:
        """The model a version names, or ``ModelNotFound``."""
        try:
            return self._load().versions[version]
        except KeyError:
            raise ModelNotFound(self.name, version) from None

    def versions(self) -> dict[str, str]:
        """Every version and the model it names, in registration order."""
        return self._load().versions

    def _alias(self, depth: int, alias: str) -> RegistryEntry:
        state = self._load()
        if len(state.chain) < depth:
            raise ModelNotFound(self.name, alias)
        version = state.chain[-depth]
        return RegistryEntry(version=version, model_id=state.versions[version])

    def _load(self) -> RegistryState:
        if not self._root.exists(self._path):
            return RegistryState(name=self.name)
        return RegistryState.model_validate_json(self._root.read_bytes(self._path))

    def _update(self, change: Callable[[RegistryState], tuple[bool, T]]) -> T:
        with self._locked() as state:
            changed, result = change(state)
            if changed:
                state.revision += 1
                self._root.write_bytes(self._path, state.model_dump_json(indent=2).encode())
            return result

    @contextmanager
    def _locked(self) -> Iterator[RegistryState]:
        with self._root.lock(f"registry/{self.name}.lock"):
            yield self._load()


def _register(state: RegistryState, model_id: str, by: str) -> tuple[bool, str]:
    for version, known in state.versions.items():
        if known == model_id:
            return False, version
    version = f"v{len(state.versions) + 1}"
    state.versions[version] = check_id("model id", model_id)
    state.history.append(
        HistoryEntry(at=utc_now(), by=by, action="register", model_id=model_id, to_version=version)
    )
    return True, version


def _promote(
    state: RegistryState, model_id: str | None, version: str | None, reason: str, by: str
) -> tuple[bool, str]:
    registered, target = _target_version(state, model_id, version, by)
    old = state.chain[-1] if state.chain else None
    if target == old:
        return registered, target
    state.chain = [v for v in state.chain if v != target] + [target]
    _moved(state, "promote", target, (old, target), reason, by)
    return True, target


def _target_version(
    state: RegistryState, model_id: str | None, version: str | None, by: str
) -> tuple[bool, str]:
    if (model_id is None) == (version is None):
        raise InvalidInput("promote needs exactly one of model_id or version")
    if model_id is not None:
        return _register(state, model_id, by)
    if version not in state.versions:
        raise ModelNotFound(state.name, version)
    return False, version


def _revert(state: RegistryState, version: str, reason: str, by: str) -> tuple[bool, str]:
    if version not in state.versions:
        raise ModelNotFound(state.name, version)
    if not state.chain or state.chain[-1] != version:
        return False, state.chain[-1] if state.chain else version
    return _demote(state, reason, by)


def _demote(state: RegistryState, reason: str, by: str) -> tuple[bool, str]:
    if len(state.chain) < 2:
        raise ModelNotFound(state.name, "previous")
    demoted = state.chain.pop()
    _moved(state, "demote", demoted, (demoted, state.chain[-1]), reason, by)
    return True, state.chain[-1]


def _moved(state: RegistryState, action: Literal["promote", "demote"], version: str,
           change: tuple[str | None, str], reason: str, by: str) -> None:
    """Record that ``version`` was promoted or demoted: the champion went from
    ``change[0]`` to ``change[1]``."""
    state.history.append(HistoryEntry(
        at=utc_now(), by=by, action=action, model_id=state.versions[version],
        from_version=change[0], to_version=change[1], reason=reason))
