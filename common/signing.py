"""Signing keys of artifacts: one key signs, several verify, each known by its id.

dill artifacts are code: whoever can sign one can run code in every service that loads
it. So outside local development (``CONVEYOR_LOCAL_DEV``) a service refuses to start
with the published default key or a key shorter than ``MIN_KEY_BYTES``, naming the
setting. Every signature records the id of the key that made it, and a ``Keyring`` holds
the signing key plus older verify keys (``CONVEYOR_MODEL_VERIFY_KEYS``), so a key rotates
without re-signing what it signed. A signature is bound to a *context* (``MODEL``,
``FEATURE_PIPELINE``): a signed feature pipeline is never accepted as a model.

Example::

    keys = Keyring.from_settings(settings)          # WeakSigningKey outside local dev
    key_id, signature = keys.sign(MODEL, message)
    keys.verify(MODEL, message, key_id, signature)  # False: unknown key id or a mismatch
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import ConveyorError, InvalidInput
from common.settings import Settings

MODEL = "model"
"""Context of model artifacts."""
FEATURE_PIPELINE = "feature-pipeline"
"""Context of fitted feature pipelines."""
CONTEXTS = (MODEL, FEATURE_PIPELINE)
MIN_KEY_BYTES = 32
"""Shortest key accepted outside local development (256 bits, HMAC-SHA256's own size)."""
PUBLISHED_DEFAULT = str(Settings.model_fields["model_signing_key"].default.get_secret_value())
"""The default key shipped in the source: known to everyone, so it signs nothing real."""
_DOMAIN = b"conveyor-signature-v2\x00"


class WeakSigningKey(ConveyorError):
    """A signing or verify key that must not be used outside local development."""

    def __init__(self, setting: str, problem: str):
        self.setting = setting
        super().__init__(
            f"{setting} {problem}: set a random secret of at least {MIN_KEY_BYTES} bytes "
            "(e.g. `openssl rand -hex 32`), or CONVEYOR_LOCAL_DEV=true for local development")


@dataclass(frozen=True)
class Keyring:
    """The key that signs (``signing_id``) and every key that verifies, by id."""

    signing_id: str
    keys: Mapping[str, bytes]

    def __post_init__(self) -> None:
        if not self.keys.get(self.signing_id):
            raise InvalidInput(f"the signing key {self.signing_id!r} is empty or missing")

    @classmethod
    def single(cls, key: bytes, key_id: str = "local") -> Keyring:
        """A keyring of one key that both signs and verifies."""
        return cls(key_id, {key_id: key})

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        """The keys of the settings, checked unless ``settings.local_dev``."""
        signing = settings.model_signing_key.get_secret_value()
        verify = {k: v.get_secret_value() for k, v in settings.model_verify_keys.items()}
        if not settings.local_dev:
            check_key("CONVEYOR_MODEL_SIGNING_KEY", signing)
            for key_id, key in verify.items():
                check_key(f"CONVEYOR_MODEL_VERIFY_KEYS[{key_id}]", key)
        keys = {k: v.encode() for k, v in verify.items()}
        return cls(settings.model_signing_key_id, {**keys, settings.model_signing_key_id:
                                                   signing.encode()})

    def sign(self, context: str, message: bytes) -> tuple[str, str]:
        """(key id, hex HMAC-SHA256) of a message in a context, with the signing key."""
        return self.signing_id, _mac(self.keys[self.signing_id], context, message)

    def verify(self, context: str, message: bytes, key_id: str, signature: str) -> bool:
        """Whether the key ``key_id`` signed this message in this context."""
        key = self.keys.get(key_id)
        if key is None:
            return False
        return hmac.compare_digest(_mac(key, context, message), signature)


def check_key(setting: str, key: str) -> None:
    """``WeakSigningKey`` naming ``setting`` if the key is the published default or short."""
    if key == PUBLISHED_DEFAULT:
        raise WeakSigningKey(setting, "is the published default key")
    if len(key.encode()) < MIN_KEY_BYTES:
        raise WeakSigningKey(setting, f"is shorter than {MIN_KEY_BYTES} bytes")


def _mac(key: bytes, context: str, message: bytes) -> str:
    if context not in CONTEXTS:
        raise InvalidInput(f"unknown signing context {context!r} (known: {', '.join(CONTEXTS)})")
    return hmac.new(key, _DOMAIN + context.encode() + b"\x00" + message, hashlib.sha256).hexdigest()
