"""Model store (signing, verification, metadata) and model registry (aliases, history)."""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
from pathlib import Path

import pytest
from sklearn.linear_model import LogisticRegression

import common.stores.models as models_module
from common.errors import ArtifactSignatureError, InvalidInput, ModelNotFound
from common.settings import Settings
from common.stores.models import ModelRegistry, ModelStore

KEY = b"test-signing-key"


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(str(tmp_path), KEY)


def fitted_model() -> LogisticRegression:
    return LogisticRegression().fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])


def artifact(tmp_path: Path, model_id: str) -> Path:
    return tmp_path / "models" / model_id / "model.signed"


def split_artifact(path: Path) -> tuple[bytes, dict, bytes]:
    magic, header, payload = path.read_bytes().split(b"\n", 2)
    return magic, json.loads(header), payload


def test_save_then_load_gives_the_model_back(store):
    store.save("m1", fitted_model(), {"algorithm": "logreg"})
    loaded = store.load("m1")
    assert loaded.predict([[0.0], [3.0]]).tolist() == [0, 1]


def test_signature_is_an_hmac_of_the_context_id_digest_and_bound_metadata(store, tmp_path):
    store.save("m1", {"weights": [1, 2]}, {"feature_set_id": "fs1", "features": ["b", "a"],
                                           "algorithm": "x"})
    magic, header, payload = split_artifact(artifact(tmp_path, "m1"))
    digest = hashlib.sha256(payload).hexdigest()
    bound = b'{"feature_set_id":"fs1","features":["b","a"]}'
    message = b"conveyor-signature-v2\x00model\x00m1\x00" + digest.encode() + b"\x00" + bound
    assert magic == b"CONVEYOR-SIGNED/2"
    assert header == {"context": "model", "key_id": "local", "sha256": digest,
                      "bound": {"feature_set_id": "fs1", "features": ["b", "a"]},
                      "signature": hmac.new(KEY, message, hashlib.sha256).hexdigest()}
    assert sorted(p.name for p in (tmp_path / "models" / "m1").iterdir()) == [
        "metadata.json", "model.signed"]  # signature and artifact in one file, no leftovers


def test_one_changed_byte_is_refused_before_unpickling(store, tmp_path, monkeypatch):
    store.save("m1", fitted_model(), {})
    path = artifact(tmp_path, "m1")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    monkeypatch.setattr(models_module.dill, "loads", _must_not_unpickle)
    with pytest.raises(ArtifactSignatureError, match="m1.*signature does not verify with key "
                       "'local'") as caught:
        store.load("m1")
    assert caught.value.model_id == "m1"


def _must_not_unpickle(*args, **kwargs):
    raise AssertionError("dill.loads ran on unverified bytes")


def test_missing_signature_is_refused(store, tmp_path, monkeypatch):
    store.save("m1", fitted_model(), {})
    path = artifact(tmp_path, "m1")
    path.write_bytes(split_artifact(path)[2])  # the bare dill bytes
    monkeypatch.setattr(models_module.dill, "loads", _must_not_unpickle)
    with pytest.raises(ArtifactSignatureError, match="m1.*no signature"):
        store.load("m1")


def test_another_key_is_refused(store, tmp_path):
    store.save("m1", fitted_model(), {})
    with pytest.raises(ArtifactSignatureError, match="signature does not verify"):
        ModelStore(str(tmp_path), b"another-key").load("m1")


def test_an_artifact_copied_under_another_id_is_refused(store, tmp_path):
    store.save("m1", fitted_model(), {})
    store.save("m2", {"other": True}, {})
    artifact(tmp_path, "m2").write_bytes(artifact(tmp_path, "m1").read_bytes())
    with pytest.raises(ArtifactSignatureError, match="m2.*signature does not verify"):
        store.load("m2")


def test_saving_an_id_again_changes_nothing(store, tmp_path):
    first = store.save("m1", {"version": 1}, {"algorithm": "a"})
    store.update_metadata("m1", status="champion")
    again = store.save("m1", {"version": 2}, {"algorithm": "b"})
    assert again.status == "champion" and again.metadata == {"algorithm": "a"}
    assert again.created_at == first.created_at
    assert store.load("m1") == {"version": 1}


def test_metadata_and_updates(store):
    record = store.save("m1", 1, {"algorithm": "rf", "params": {"n": 10}, "status": "candidate"})
    assert record.status == "candidate" and record.metadata["params"] == {"n": 10}
    updated = store.update_metadata("m1", status="rejected", reason="auc too low")
    assert updated.status == "rejected"
    assert updated.metadata == {"algorithm": "rf", "params": {"n": 10}, "reason": "auc too low"}
    assert store.metadata("m1") == updated and updated.updated_at >= record.updated_at


def test_unknown_status_is_refused(store):
    store.save("m1", 1, {})
    with pytest.raises(InvalidInput, match="bogus"):
        store.update_metadata("m1", status="bogus")
    with pytest.raises(InvalidInput, match="bogus"):
        store.save("m2", 1, {"status": "bogus"})
    assert not store.exists("m2")


def test_list_is_oldest_first(store):
    for model_id in ("b", "a", "c"):
        store.save(model_id, model_id, {})
    assert [r.model_id for r in store.list()] == ["b", "a", "c"]


def test_missing_model_is_model_not_found(store):
    for call in (store.load, store.metadata):
        with pytest.raises(ModelNotFound, match="model nope not found"):
            call("nope")
    with pytest.raises(ModelNotFound):
        store.update_metadata("nope", status="champion")


def test_store_from_settings_uses_the_settings_key(tmp_path):
    settings = Settings(data_root=str(tmp_path), model_signing_key="k-from-settings")
    ModelStore.from_settings(settings).save("m1", 7, {})
    assert ModelStore(str(tmp_path), b"k-from-settings").load("m1") == 7
    with pytest.raises(InvalidInput):
        ModelStore(str(tmp_path), b"")


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(str(tmp_path), name="fraud")


def test_first_promotion_makes_a_champion_without_previous(registry):
    assert registry.promote("m1", reason="first", by="alice") == "v1"
    assert registry.champion().model_id == "m1" and registry.champion().version == "v1"
    with pytest.raises(ModelNotFound, match="fraud with version previous"):
        registry.previous()


def test_promotion_moves_the_champion_to_previous(registry):
    registry.promote("m1", reason="first", by="alice")
    assert registry.promote("m2", reason="auc 0.91 > 0.89", by="evaluation") == "v2"
    assert (registry.champion().version, registry.previous().version) == ("v2", "v1")
    last = registry.history()[-1]
    assert (last.action, last.from_version, last.to_version) == ("promote", "v1", "v2")
    assert (last.by, last.reason, last.model_id) == ("evaluation", "auc 0.91 > 0.89", "m2")


def test_promoting_the_champion_again_changes_nothing(registry):
    registry.promote("m1", reason="first")
    before = registry.history()
    assert registry.promote("m1", reason="redelivered") == "v1"
    assert registry.history() == before


def test_demote_puts_the_previous_model_back(registry):
    registry.promote("m1")
    registry.promote("m2")
    registry.promote("m3")
    assert registry.demote(reason="latency", by="monitoring") == "v2"
    assert (registry.champion().model_id, registry.previous().model_id) == ("m2", "m1")
    last = registry.history()[-1]
    assert (last.action, last.from_version, last.to_version, last.reason) == (
        "demote",
        "v3",
        "v2",
        "latency",
    )
    assert registry.demote() == "v1"
    with pytest.raises(ModelNotFound):
        registry.demote()


def test_promote_by_version_and_the_chain(registry):
    registry.promote("m1")
    registry.promote("m2")
    registry.promote(version="v1", reason="roll back by hand")
    assert [e.version for e in registry.chain()] == ["v1", "v2"]
    with pytest.raises(ModelNotFound, match="v9"):
        registry.promote(version="v9")
    with pytest.raises(InvalidInput):
        registry.promote("m1", version="v1")


def test_versions_follow_registration_order(registry):
    assert registry.register("a") == "v1"
    assert registry.register("b") == "v2"
    assert registry.register("a") == "v1"
    assert registry.promote("c") == "v3"
    assert registry.versions() == {"v1": "a", "v2": "b", "v3": "c"}
    assert registry.version_of("b") == "v2" and registry.model_id_of("v3") == "c"
    with pytest.raises(ModelNotFound):
        registry.version_of("zzz")
    with pytest.raises(ModelNotFound, match="fraud with version v7"):
        registry.model_id_of("v7")


def test_empty_registry_has_no_champion(registry):
    with pytest.raises(ModelNotFound, match="fraud with version champion"):
        registry.champion()
    assert registry.history() == [] and registry.chain() == []


def test_registries_of_different_names_are_separate(tmp_path):
    ModelRegistry(str(tmp_path), "a").promote("m1")
    assert ModelRegistry(str(tmp_path), "b").versions() == {}


def _promote_many(root: str, worker: int, count: int) -> None:
    registry = ModelRegistry(root, name="fraud")
    for i in range(count):
        registry.promote(f"w{worker}-m{i}", reason=f"worker {worker}", by=f"worker-{worker}")


def test_concurrent_promotions_from_processes_keep_a_consistent_history(tmp_path):
    workers, count = 4, 15
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_promote_many, args=(str(tmp_path), w, count))
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * workers
    registry = ModelRegistry(str(tmp_path), name="fraud")
    total = workers * count
    assert list(registry.versions()) == [f"v{i}" for i in range(1, total + 1)]
    assert len(set(registry.versions().values())) == total
    promotions = [e for e in registry.history() if e.action == "promote"]
    assert len(promotions) == total
    for before, after in zip(promotions, promotions[1:], strict=False):
        assert after.from_version == before.to_version
    assert registry.champion().version == promotions[-1].to_version
    document = json.loads((tmp_path / "registry" / "fraud.json").read_text())
    assert document["revision"] == total
