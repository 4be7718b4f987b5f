"""TLS and bearer-token authentication of the scoring server: a real server with a
self-signed certificate made here (openssl), real secure channels, the real Redis."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.settings import Settings
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as v2pb
from protos.inference import grpc_service_pb2_grpc as v2pb_grpc
from scoring.core import ScoringCore
from scoring.inputs import InputSchema
from scoring.security import ServerSecurity, SettingFileError
from scoring.server import GrpcSettings, ScoringServer, field_value
from scoring.service import ScoringSettings
from tests.fixtures.scoring import ScoringWorld, fields_of, status_of

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None,
                       reason="the openssl CLI makes the test certificates and is missing"),
]

TOKEN = "s3cret-token"
MISSING = "missing bearer token: send metadata 'authorization: Bearer <token>'"


@dataclass(frozen=True)
class Pem:
    """A self-signed certificate and its key, as files."""

    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


def self_signed(directory: Path, name: str) -> Pem:
    """A P-256 certificate for 127.0.0.1 and localhost, valid one day."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True)
    return Pem(cert, key)


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    directory = tmp_path_factory.mktemp("tls")
    return {name: self_signed(directory, name) for name in ("server", "client", "stranger")}


def serve(core: ScoringCore, security: ServerSecurity) -> ScoringServer:
    return ScoringServer(core, GrpcSettings(host="127.0.0.1", port=0),
                         security=security).start()


@pytest.fixture
def secure_server(core: ScoringCore, pems: dict[str, Pem]) -> Iterator[ScoringServer]:
    security = ServerSecurity.from_settings(
        tokens=f"other-token, {TOKEN}", cert_file=str(pems["server"].cert),
        key_file=str(pems["server"].key))
    server = serve(core, security)
    yield server
    server.stop(0)


@pytest.fixture
def channel(secure_server: ScoringServer, pems: dict[str, Pem]) -> Iterator[grpc.Channel]:
    credentials = grpc.ssl_channel_credentials(pems["server"].cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{secure_server.port}", credentials) as channel:
        yield channel


def request(world: ScoringWorld, position: int = 3) -> pb.ScoreRequest:
    row = world.frame.iloc[position]
    fields = fields_of(row, InputSchema.of(world.fitted))
    return pb.ScoreRequest(entity_id=row["nameOrig"],
                           fields={k: field_value(v) for k, v in fields.items()})


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_the_right_token_over_tls_is_answered(world: ScoringWorld, channel: grpc.Channel) -> None:
    reply = pb_grpc.ScoringStub(channel).Score(request(world), timeout=5, metadata=bearer(TOKEN))
    assert reply.model_version == "v2"
    inference = v2pb_grpc.GRPCInferenceServiceStub(channel)
    assert inference.ServerReady(v2pb.ServerReadyRequest(), timeout=5,
                                 metadata=bearer("other-token")).ready


@pytest.mark.parametrize(("metadata", "message"), [
    (None, MISSING),
    (bearer("wrong-token"), "invalid bearer token"),
    (bearer(TOKEN + "x"), "invalid bearer token"),
    ([("authorization", f"Basic {TOKEN}")],
     "malformed authorization metadata: expected 'Bearer <token>'"),
])
def test_a_missing_or_wrong_token_is_unauthenticated(
        world: ScoringWorld, channel: grpc.Channel, metadata: Any, message: str) -> None:
    score = pb_grpc.ScoringStub(channel).Score
    assert status_of(lambda: score(request(world), timeout=5, metadata=metadata)) == (
        grpc.StatusCode.UNAUTHENTICATED, message)
    ready = v2pb_grpc.GRPCInferenceServiceStub(channel).ServerReady
    assert status_of(lambda: ready(v2pb.ServerReadyRequest(), timeout=5, metadata=metadata)) == (
        grpc.StatusCode.UNAUTHENTICATED, message)


def test_reflection_needs_the_token_too(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")

    def services(metadata: Any) -> list[str]:
        replies = stub.ServerReflectionInfo(iter([ask]), timeout=5, metadata=metadata)
        return [s.name for r in replies for s in r.list_services_response.service]

    assert "inference.GRPCInferenceService" in services(bearer(TOKEN))
    assert status_of(lambda: services(None)) == (grpc.StatusCode.UNAUTHENTICATED, MISSING)


def test_health_answers_without_a_token(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "conveyor.scoring.v1.Scoring", "inference.GRPCInferenceService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_plain_text_client_cannot_talk_to_a_tls_server(
        world: ScoringWorld, secure_server: ScoringServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{secure_server.port}") as plain:
        code, _ = status_of(lambda: pb_grpc.ScoringStub(plain).Score(
            request(world), timeout=5, metadata=bearer(TOKEN)))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_cannot_connect(
        world: ScoringWorld, secure_server: ScoringServer, pems: dict[str, Pem]) -> None:
    credentials = grpc.ssl_channel_credentials(pems["stranger"].cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{secure_server.port}", credentials) as channel:
        code, _ = status_of(lambda: pb_grpc.ScoringStub(channel).Score(
            request(world), timeout=5, metadata=bearer(TOKEN)))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_takes_only_clients_with_a_certificate_of_the_client_ca(
        world: ScoringWorld, core: ScoringCore, pems: dict[str, Pem]) -> None:
    server_pem = pems["server"]
    security = ServerSecurity.from_settings(
        cert_file=str(server_pem.cert), key_file=str(server_pem.key),
        client_ca_file=str(pems["client"].cert))
    server = serve(core, security)
    address = f"127.0.0.1:{server.port}"
    ca = server_pem.cert.read_bytes()
    try:
        for client, works in (("client", True), ("stranger", False), (None, False)):
            chain = pems[client].read() if client else (None, None)
            credentials = grpc.ssl_channel_credentials(ca, private_key=chain[1],
                                                       certificate_chain=chain[0])
            with grpc.secure_channel(address, credentials) as channel:
                stub = pb_grpc.ScoringStub(channel)
                if works:
                    assert stub.Score(request(world), timeout=5).model_version == "v2"
                else:
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.Score(request(world), timeout=5)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, client
    finally:
        server.stop(0)


def test_tokens_without_tls_are_checked_too(world: ScoringWorld, core: ScoringCore,
                                            tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("\nfrom-file\n\n")
    server = serve(core, ServerSecurity.from_settings(tokens_file=str(tokens)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            score = pb_grpc.ScoringStub(channel).Score
            assert score(request(world), timeout=5, metadata=bearer("from-file")).model_version
            assert status_of(lambda: score(request(world), timeout=5)) == (
                grpc.StatusCode.UNAUTHENTICATED, MISSING)
    finally:
        server.stop(0)


def score_command(world: ScoringWorld, server: ScoringServer) -> list[str]:
    """``conveyor score`` arguments of one history row, to ``server``."""
    row = world.frame.iloc[3]
    args = ["score", "--entity", str(row["nameOrig"]), "--target", f"127.0.0.1:{server.port}"]
    for name, value in fields_of(row, InputSchema.of(world.fitted)).items():
        args += ["--field", f"{name}={value}"]
    return args


def test_the_score_command_sends_the_token_over_tls(
        world: ScoringWorld, secure_server: ScoringServer, pems: dict[str, Pem]) -> None:
    from click.testing import CliRunner

    from app.cli import main

    args = [*score_command(world, secure_server), "--tls-ca", str(pems["server"].cert)]
    answered = CliRunner().invoke(main, [*args, "--token", TOKEN])
    assert answered.exit_code == 0, answered.output
    assert json.loads(answered.output)["model_version"] == "v2"
    refused = CliRunner().invoke(main, args, env={"CONVEYOR_GRPC_TOKEN": "nope"})
    assert refused.exit_code == 1
    assert "UNAUTHENTICATED: invalid bearer token" in refused.output


def test_the_score_command_takes_the_client_token_and_ca_from_the_settings(
        world: ScoringWorld, secure_server: ScoringServer, pems: dict[str, Pem],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from app.cli import main

    args = score_command(world, secure_server)
    monkeypatch.setenv("CONVEYOR_GRPC_TLS_CA", str(pems["server"].cert))
    monkeypatch.setenv("CONVEYOR_GRPC_TOKEN", TOKEN)
    answered = CliRunner().invoke(main, args)
    assert answered.exit_code == 0, answered.output
    assert json.loads(answered.output)["model_version"] == "v2"
    monkeypatch.delenv("CONVEYOR_GRPC_TOKEN")
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1
    assert f"Error: UNAUTHENTICATED: {MISSING} (set CONVEYOR_GRPC_TOKEN, or give --token, " \
        "to one of the service's tokens)" in refused.output


def test_the_demo_client_sends_the_settings_token_over_tls(
        world: ScoringWorld, secure_server: ScoringServer, pems: dict[str, Pem]) -> None:
    from app.demo_monitoring import NotAuthenticated, scoring_client

    row = {**fields_of(world.frame.iloc[3], InputSchema.of(world.fitted)),
           "nameOrig": world.frame.iloc[3]["nameOrig"]}
    config: Any = SimpleNamespace(features=SimpleNamespace(entity_key="nameOrig",
                                                           label="isFraud"))
    ca = str(pems["server"].cert)
    with_token = Settings(grpc_token=TOKEN, grpc_tls_ca=ca)
    with scoring_client(with_token, config, secure_server.port) as client:
        assert client.serves(row, "v2")
    with scoring_client(Settings(grpc_tls_ca=ca), config, secure_server.port) as client:
        assert client.score(row).error == f"UNAUTHENTICATED: {MISSING}"
        with pytest.raises(NotAuthenticated, match="set CONVEYOR_GRPC_TOKEN to one of its"):
            client.serves(row, "v2")


@pytest.mark.parametrize(("env", "setting"), [
    ({"CONVEYOR_GRPC_TLS_CERT": "{missing}", "CONVEYOR_GRPC_TLS_KEY": "{key}"},
     "CONVEYOR_GRPC_TLS_CERT"),
    ({"CONVEYOR_GRPC_TLS_CERT": "{cert}", "CONVEYOR_GRPC_TLS_KEY": "{missing}"},
     "CONVEYOR_GRPC_TLS_KEY"),
    ({"CONVEYOR_GRPC_TLS_CERT": "{cert}", "CONVEYOR_GRPC_TLS_KEY": "{key}",
      "CONVEYOR_GRPC_TLS_CLIENT_CA": "{missing}"}, "CONVEYOR_GRPC_TLS_CLIENT_CA"),
    ({"CONVEYOR_GRPC_AUTH_TOKENS_FILE": "{missing}"}, "CONVEYOR_GRPC_AUTH_TOKENS_FILE"),
])
def test_a_setting_naming_a_missing_file_fails_naming_setting_and_path(
        monkeypatch: pytest.MonkeyPatch, pems: dict[str, Pem], tmp_path: Path,
        env: dict[str, str], setting: str) -> None:
    missing = tmp_path / "nowhere.pem"
    paths = {"missing": str(missing), "cert": str(pems["server"].cert),
             "key": str(pems["server"].key)}
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**paths))
    with pytest.raises(SettingFileError) as raised:
        ScoringSettings().security()
    assert str(raised.value) == (
        f"setting {setting} names {missing}: cannot be read (No such file or directory)")


def test_half_a_tls_setting_and_an_empty_token_file_are_refused(
        pems: dict[str, Pem], tmp_path: Path) -> None:
    cert = str(pems["server"].cert)
    with pytest.raises(SettingFileError, match="TLS needs both CONVEYOR_GRPC_TLS_CERT and"):
        ServerSecurity.from_settings(cert_file=cert)
    empty = tmp_path / "tokens"
    empty.write_text("\n \n")
    with pytest.raises(SettingFileError) as raised:
        ServerSecurity.from_settings(tokens_file=str(empty))
    assert str(raised.value) == (
        f"setting CONVEYOR_GRPC_AUTH_TOKENS_FILE names {empty}: the file holds no token "
        "(one per line)")
