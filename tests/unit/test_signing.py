"""Signing keys: weak keys refused outside local development, rotation by key id, the
metadata that decides how a model is used signed with it, and separate contexts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from common.errors import ArtifactSignatureError, InvalidInput
from common.settings import Settings
from common.signing import FEATURE_PIPELINE, MODEL, PUBLISHED_DEFAULT, Keyring, WeakSigningKey
from common.stores import ModelStore
from common.wiring import Stores

OLD, NEW = b"o" * 32, b"n" * 32
STRONG = "s" * 32


def prod(**values: object) -> Settings:
    return Settings(local_dev=False, **values)  # type: ignore[arg-type]


def test_the_published_default_key_refuses_to_start_outside_local_development(
    tmp_path: Path,
) -> None:
    assert Settings.model_fields["local_dev"].default is False
    settings = prod(data_root=str(tmp_path))
    assert settings.model_signing_key.get_secret_value() == PUBLISHED_DEFAULT
    with pytest.raises(WeakSigningKey, match="CONVEYOR_MODEL_SIGNING_KEY is the published "
                       "default key.*CONVEYOR_LOCAL_DEV"):
        Stores.from_settings(settings)
    with pytest.raises(WeakSigningKey, match="CONVEYOR_MODEL_SIGNING_KEY"):
        ModelStore.from_settings(settings)


def test_a_short_key_refuses_to_start_and_a_long_one_starts(tmp_path: Path) -> None:
    with pytest.raises(WeakSigningKey, match="CONVEYOR_MODEL_SIGNING_KEY is shorter than 32"):
        Keyring.from_settings(prod(model_signing_key="s" * 31))
    with pytest.raises(WeakSigningKey, match=r"CONVEYOR_MODEL_VERIFY_KEYS\[old\] is shorter"):
        Keyring.from_settings(prod(model_signing_key=STRONG, model_verify_keys={"old": "x"}))
    keys = Keyring.from_settings(prod(model_signing_key=STRONG, model_signing_key_id="k2"))
    assert keys.signing_id == "k2" and keys.keys == {"k2": STRONG.encode()}


def test_local_development_accepts_the_default_key() -> None:
    keys = Keyring.from_settings(Settings(local_dev=True))
    assert keys.keys == {"local": PUBLISHED_DEFAULT.encode()}


def test_the_key_never_shows_in_the_error() -> None:
    with pytest.raises(WeakSigningKey) as refused:
        Keyring.from_settings(prod(model_signing_key="tiny-secret-value"))
    assert "tiny-secret-value" not in str(refused.value)


def test_a_rotated_key_still_verifies_what_it_signed_without_re_signing(tmp_path: Path) -> None:
    ModelStore(str(tmp_path), Keyring("k1", {"k1": OLD})).save("m1", {"w": 1}, {})
    rotated = ModelStore(str(tmp_path), Keyring("k2", {"k1": OLD, "k2": NEW}))
    rotated.save("m2", {"w": 2}, {})
    assert rotated.load("m1") == {"w": 1} and rotated.load("m2") == {"w": 2}
    retired = ModelStore(str(tmp_path), Keyring("k2", {"k2": NEW}))
    assert retired.load("m2") == {"w": 2}
    with pytest.raises(ArtifactSignatureError, match="m1.*unknown key id 'k1' .known: k2"):
        retired.load("m1")


def test_rotation_through_settings(tmp_path: Path) -> None:
    before = prod(data_root=str(tmp_path), model_signing_key=OLD.decode(),
                  model_signing_key_id="2026-01")
    Stores.from_settings(before).models.save("m1", 1, {})
    after = prod(data_root=str(tmp_path), model_signing_key=NEW.decode(),
                 model_signing_key_id="2026-06",
                 model_verify_keys={"2026-01": SecretStr(OLD.decode())})
    assert Stores.from_settings(after).models.load("m1") == 1


def test_a_forged_key_id_does_not_help(tmp_path: Path) -> None:
    ModelStore(str(tmp_path), Keyring("k1", {"k1": OLD})).save("m1", 1, {})
    path = tmp_path / "models" / "m1" / "model.signed"
    magic, header, payload = path.read_bytes().split(b"\n", 2)
    fields = json.loads(header) | {"key_id": "k2"}
    path.write_bytes(b"\n".join((magic, json.dumps(fields).encode(), payload)))
    with pytest.raises(ArtifactSignatureError, match="signature does not verify with key 'k2'"):
        ModelStore(str(tmp_path), Keyring("k2", {"k1": OLD, "k2": NEW})).load("m1")


@pytest.mark.parametrize("change", [{"feature_set_id": "fs-other"},
                                    {"features": ["b", "a"]}, {"features": ["a"]}])
def test_changing_the_feature_set_or_feature_order_in_the_record_is_refused(
    tmp_path: Path, change: dict
) -> None:
    store = ModelStore(str(tmp_path), NEW)
    store.save("m1", 1, {"feature_set_id": "fs1", "features": ["a", "b"]})
    path = tmp_path / "models" / "m1" / "metadata.json"
    record = json.loads(path.read_text())
    record["metadata"] |= change
    path.write_text(json.dumps(record))
    key = next(iter(change))
    with pytest.raises(ArtifactSignatureError, match=f"m1.*metadata {key} is not the one key "
                       "'local' signed"):
        store.load("m1")


def test_bound_metadata_cannot_be_updated_but_the_rest_can(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path), NEW)
    store.save("m1", 1, {"feature_set_id": "fs1", "features": ["a", "b"]})
    with pytest.raises(InvalidInput, match="features of model m1 is signed"):
        store.update_metadata("m1", features=["b", "a"])
    store.update_metadata("m1", status="champion", features=["a", "b"], auc=0.9)
    assert store.load("m1") == 1


def test_a_feature_pipeline_is_never_accepted_as_a_model(tmp_path: Path) -> None:
    keys = Keyring.single(NEW)
    pipelines = ModelStore(str(tmp_path / "pipelines"), keys, context=FEATURE_PIPELINE)
    models = ModelStore(str(tmp_path / "models"), keys, context=MODEL)
    pipelines.save("x1", {"pipeline": True}, {})
    target = tmp_path / "models" / "models" / "x1"
    target.mkdir(parents=True)
    for name in ("model.signed", "metadata.json"):
        target.joinpath(name).write_bytes(
            (tmp_path / "pipelines" / "models" / "x1" / name).read_bytes())
    with pytest.raises(ArtifactSignatureError, match="x1.*signed as a feature-pipeline, not a "
                       "model"):
        models.load("x1")
    assert pipelines.load("x1") == {"pipeline": True}


def test_the_wired_stores_sign_in_their_own_contexts(tmp_path: Path) -> None:
    stores = Stores.from_settings(Settings(data_root=str(tmp_path), local_dev=True))
    assert (stores.models.context, stores.feature_pipelines.context) == (MODEL, FEATURE_PIPELINE)
    stores.redis.close()
