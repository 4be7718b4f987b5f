"""The Open Inference Protocol (KServe V2) over gRPC: a real in-process server, a real
``GRPCInferenceServiceStub``, the real Redis (through the scoring world)."""

from __future__ import annotations

import re
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from common.stores import ModelRegistry
from protos.conveyor.scoring.v1 import scoring_pb2 as spb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as spb_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from scoring.core import ScoringCore
from scoring.inputs import InputSchema
from scoring.oip import MAX_ROWS, field_tensors
from scoring.server import GrpcSettings, ScoringServer, field_value
from tests.fixtures.scoring import ScoringWorld, fields_of, slow_champion_channel, status_of

pytestmark = pytest.mark.integration

Tensor = pb.ModelInferRequest.InferInputTensor
Contents = pb.InferTensorContents


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def raw_fields(world: ScoringWorld, positions: range) -> list[dict[str, Any]]:
    """Request fields of some history rows, as a client sends them."""
    schema = InputSchema.of(world.fitted)
    return [fields_of(world.frame.iloc[p], schema) for p in positions]


def infer(records: list[dict[str, Any]], **request: Any) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="fraud", inputs=field_tensors(records), **request)


def matrix_tensor(matrix: np.ndarray, datatype: str = "FP64", name: str = "input-0") -> Any:
    field = {"FP64": "fp64_contents", "FP32": "fp32_contents"}[datatype]
    return Tensor(name=name, datatype=datatype, shape=list(matrix.shape),
                  contents=Contents(**{field: matrix.ravel().tolist()}))


def probabilities(reply: pb.ModelInferResponse) -> np.ndarray:
    out = {o.name: o for o in reply.outputs}["predict_proba"]
    return np.asarray(out.contents.fp64_contents).reshape(list(out.shape))


def score(world: ScoringWorld, channel: grpc.Channel, entity: str, fields: dict[str, Any],
          version: str = "") -> spb.ScoreResponse:
    request = spb.ScoreRequest(entity_id=entity, model_version=version,
                               fields={k: field_value(v) for k, v in fields.items()})
    return spb_grpc.ScoringStub(channel).Score(request, timeout=5)


# -- health and metadata -----------------------------------------------------------------


def test_server_is_live_and_ready_with_a_model(stub: Any) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready


def test_server_without_a_model_is_live_not_ready_and_infer_is_unavailable(
        world: ScoringWorld, tmp_path: Path) -> None:
    empty = ScoringCore(world.models, world.pipelines,
                        ModelRegistry(str(tmp_path / "empty"), "fraud"), world.online)
    assert empty.load_chain() == []
    server = ScoringServer(empty, GrpcSettings(host="127.0.0.1", port=0)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name="fraud"), timeout=5).ready
            request = infer(raw_fields(world, range(1)))
            assert status_of(lambda: stub.ModelInfer(request, timeout=5)) == (
                grpc.StatusCode.UNAVAILABLE, "model fraud has no deployed version to serve")
    finally:
        server.stop(0)
        empty.close()


def test_model_ready_by_name_and_version(stub: Any) -> None:
    ready = pb.ModelReadyRequest
    assert stub.ModelReady(ready(name="fraud"), timeout=5).ready
    assert stub.ModelReady(ready(name="fraud", version="v1"), timeout=5).ready
    assert stub.ModelReady(ready(name="fraud", version="previous"), timeout=5).ready
    assert status_of(lambda: stub.ModelReady(ready(name="fraud", version="v9"), timeout=5)) == (
        grpc.StatusCode.NOT_FOUND, "model fraud with version v9 not found")
    assert status_of(lambda: stub.ModelReady(ready(name="other"), timeout=5)) == (
        grpc.StatusCode.NOT_FOUND, "model other not found")


def test_server_metadata_names_the_server(stub: Any) -> None:
    reply = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert (reply.name, reply.version) == ("conveyor", metadata.version("conveyor"))


def test_model_metadata_lists_raw_fields_outputs_and_versions(
        world: ScoringWorld, stub: Any) -> None:
    reply = stub.ModelMetadata(pb.ModelMetadataRequest(name="fraud"), timeout=5)
    kinds = InputSchema.of(world.fitted).kinds
    datatype = {"number": "FP64", "text": "BYTES", "flag": "BOOL", "time": "BYTES"}
    assert {(t.name, t.datatype, tuple(t.shape)) for t in reply.inputs} == {
        (name, datatype[kind], (-1,)) for name, kind in kinds.items()}
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.outputs] == [
        ("predict_proba", "FP64", [-1, 2]), ("predict", "BYTES", [-1])]
    assert (reply.name, sorted(reply.versions)) == ("fraud", ["v1", "v2"])
    status = status_of(lambda: stub.ModelMetadata(
        pb.ModelMetadataRequest(name="fraud", version="v7"), timeout=5))
    assert status == (grpc.StatusCode.NOT_FOUND, "model fraud with version v7 not found")


# -- ModelInfer --------------------------------------------------------------------------


def test_field_tensors_answer_like_score_for_entities_without_a_past(
        world: ScoringWorld, stub: Any, channel: grpc.Channel) -> None:
    records = raw_fields(world, range(10, 14))
    reply = stub.ModelInfer(infer(records, id="req-1"), timeout=5)
    expected = [score(world, channel, f"new-{i}", fields).probabilities["1"]
                for i, fields in enumerate(records)]
    assert (reply.model_name, reply.model_version, reply.id) == ("fraud", "v2", "req-1")
    np.testing.assert_allclose(probabilities(reply)[:, 1], expected, rtol=1e-9)
    labels = {o.name: o for o in reply.outputs}["predict"].contents.bytes_contents
    assert [label.decode() for label in labels] == [
        "1" if p > 0.5 else "0" for p in probabilities(reply)[:, 1]]
    assert not reply.parameters["fallback"].bool_param


def test_a_call_without_an_id_gets_one_made_up_for_it(world: ScoringWorld, stub: Any) -> None:
    records = raw_fields(world, range(10, 12))
    first, second = (stub.ModelInfer(infer(records), timeout=5) for _ in range(2))
    assert re.fullmatch(r"[0-9a-f]{32}", first.id) and first.id != second.id


def test_field_tensors_carrying_the_aggregates_answer_like_score_with_redis(
        world: ScoringWorld, stub: Any, channel: grpc.Channel) -> None:
    row = world.frame.iloc[20]
    entity = str(row["nameOrig"])
    online = world.online.read(world.fitted.feature_set_id, [entity])[0]
    assert online, "the world wrote this entity's aggregates to Redis"
    fields = raw_fields(world, range(20, 21))[0]
    carried = {**fields, **{c: float(online[c]) for c in world.fitted.aggregate_columns}}
    reply = stub.ModelInfer(infer([carried]), timeout=5)
    expected = score(world, channel, entity, fields).probabilities["1"]
    assert probabilities(reply)[0, 1] == pytest.approx(expected, rel=1e-9)


def test_a_feature_matrix_is_predicted_as_it_is(world: ScoringWorld, stub: Any) -> None:
    names = list(world.fitted.feature_names)
    matrix = world.fitted.transform(world.frame)[names].to_numpy(dtype=np.float64)[:6]
    reply = stub.ModelInfer(pb.ModelInferRequest(
        model_name="fraud", inputs=[matrix_tensor(matrix)]), timeout=5)
    expected = world.estimators["v2"].predict_proba(
        world.fitted.transform(world.frame)[names].iloc[:6])
    np.testing.assert_allclose(probabilities(reply), expected, rtol=1e-9)


def test_a_feature_matrix_answers_like_score_for_the_same_row(
        world: ScoringWorld, stub: Any, channel: grpc.Channel) -> None:
    fields = raw_fields(world, range(7, 8))[0]
    schema = InputSchema.of(world.fitted)
    features = world.fitted.transform_online([schema.record("new-7", fields, None)])
    matrix = features[list(world.fitted.feature_names)].to_numpy(dtype=np.float64)
    reply = stub.ModelInfer(pb.ModelInferRequest(
        model_name="fraud", inputs=[matrix_tensor(matrix)]), timeout=5)
    expected = score(world, channel, "new-7", fields).probabilities["1"]
    assert probabilities(reply)[0, 1] == pytest.approx(expected, rel=1e-9)


def test_model_version_routes_and_an_unknown_one_is_not_found(
        world: ScoringWorld, stub: Any, channel: grpc.Channel) -> None:
    records = raw_fields(world, range(3, 5))
    for version, answered in (("v1", "v1"), ("previous", "v1"), ("v2", "v2")):
        reply = stub.ModelInfer(infer(records, model_version=version), timeout=5)
        expected = [score(world, channel, f"new-{i}", fields, version).probabilities["1"]
                    for i, fields in enumerate(records)]
        assert reply.model_version == answered
        np.testing.assert_allclose(probabilities(reply)[:, 1], expected, rtol=1e-9)
    unknown = infer(records, model_version="v9")
    assert status_of(lambda: stub.ModelInfer(unknown, timeout=5)) == (
        grpc.StatusCode.NOT_FOUND, "model fraud with version v9 not found")
    other = pb.ModelInferRequest(model_name="churn", inputs=field_tensors(records))
    assert status_of(lambda: stub.ModelInfer(other, timeout=5)) == (
        grpc.StatusCode.NOT_FOUND, "model churn not found")


def test_raw_input_contents_answer_like_contents_and_come_back_raw(
        world: ScoringWorld, stub: Any) -> None:
    records = raw_fields(world, range(30, 33))
    plain = stub.ModelInfer(infer(records), timeout=5)
    request = pb.ModelInferRequest(model_name="fraud")
    for tensor in field_tensors(records):
        raw = Tensor(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        request.inputs.append(raw)
        request.raw_input_contents.append(raw_bytes(tensor))
    reply = stub.ModelInfer(request, timeout=5)
    assert [o.name for o in reply.outputs] == ["predict_proba", "predict"]
    proba = np.frombuffer(reply.raw_output_contents[0], dtype="<f8").reshape(3, 2)
    np.testing.assert_allclose(proba, probabilities(plain), rtol=1e-12)
    labels = unpack_bytes(reply.raw_output_contents[1])
    assert labels == list(
        {o.name: o for o in plain.outputs}["predict"].contents.bytes_contents)


def test_a_raw_fp32_matrix_is_read_little_endian(world: ScoringWorld, stub: Any) -> None:
    names = list(world.fitted.feature_names)
    frame = world.fitted.transform(world.frame)[names].iloc[:4]
    matrix = frame.to_numpy(dtype=np.float32)
    request = pb.ModelInferRequest(
        model_name="fraud", inputs=[Tensor(name="x", datatype="FP32", shape=[4, len(names)])],
        raw_input_contents=[matrix.astype("<f4").tobytes()])
    reply = stub.ModelInfer(request, timeout=5)
    proba = np.frombuffer(reply.raw_output_contents[0], dtype="<f8").reshape(4, 2)
    expected = world.estimators["v2"].predict_proba(frame.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(proba, expected, rtol=1e-9)


def test_only_the_requested_outputs_are_returned(world: ScoringWorld, stub: Any) -> None:
    request = infer(raw_fields(world, range(2)),
                    outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="predict")])
    reply = stub.ModelInfer(request, timeout=5)
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
        ("predict", "BYTES", [2])]


def test_column_tensors_and_integer_numbers_are_accepted(world: ScoringWorld, stub: Any) -> None:
    records = raw_fields(world, range(40, 43))
    plain = probabilities(stub.ModelInfer(infer(records), timeout=5))
    columns = infer(records)
    for tensor in columns.inputs:
        tensor.shape[:] = [3, 1]
    rounded = [{**r, "amount": round(r["amount"])} for r in records]
    integers = with_tensor(infer(rounded), "amount", datatype="INT64", shape=[3],
                           contents=Contents(int64_contents=[r["amount"] for r in rounded]))
    np.testing.assert_allclose(probabilities(stub.ModelInfer(columns, timeout=5)), plain)
    np.testing.assert_allclose(probabilities(stub.ModelInfer(integers, timeout=5)),
                               probabilities(stub.ModelInfer(infer(rounded), timeout=5)))


def test_a_slow_champion_is_answered_by_previous_and_says_so(world: ScoringWorld) -> None:
    with slow_champion_channel(world) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer(raw_fields(world, range(2))), timeout=1.0)
    assert (reply.model_version, reply.parameters["fallback"].bool_param) == ("v2", True)
    assert "v3 passed its deadline" in reply.parameters["fallback_reason"].string_param


def raw_bytes(tensor: Any) -> bytes:
    """A tensor's contents as raw_input_contents bytes (little-endian; BYTES prefixed)."""
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in contents.bytes_contents)
    if tensor.datatype == "BOOL":
        return np.asarray(contents.bool_contents, dtype="?").tobytes()
    return np.asarray(contents.fp64_contents, dtype="<f8").tobytes()


def unpack_bytes(raw: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(raw):
        (size,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4: at + 4 + size])
        at += 4 + size
    return out


# -- bad input ---------------------------------------------------------------------------


def with_tensor(request: pb.ModelInferRequest, name: str, **fields: Any) -> pb.ModelInferRequest:
    """The request with input ``name`` replaced by a tensor of ``fields``."""
    for index, tensor in enumerate(request.inputs):
        if tensor.name == name:
            request.inputs[index].CopyFrom(Tensor(name=name, **fields))
    return request


def bad_field_requests(world: ScoringWorld) -> dict[str, tuple[pb.ModelInferRequest, str]]:
    one = raw_fields(world, range(1))
    two = raw_fields(world, range(2))
    n = len(world.fitted.feature_names)
    fields = ", ".join(sorted(InputSchema.of(world.fitted).kinds))
    missing = infer(one)
    del missing.inputs[[t.name for t in missing.inputs].index("amount")]
    return {
        "wrong datatype": (
            with_tensor(infer(one), "amount", datatype="BYTES", shape=[1],
                        contents=Contents(bytes_contents=[b"9.5"])),
            "input 'amount' is BYTES; the field is a number (FP16, FP32, FP64, INT16, INT32, "
            "INT64, INT8, UINT16, UINT32, UINT64, UINT8)"),
        "text as a number": (
            with_tensor(infer(one), "type", datatype="FP64", shape=[1],
                        contents=Contents(fp64_contents=[3.0])),
            "input 'type' is FP64; the field is a text (BYTES)"),
        "values do not fill the shape": (
            with_tensor(infer(one), "amount", datatype="FP64", shape=[2],
                        contents=Contents(fp64_contents=[1.0])),
            "input 'amount' has 1 values for shape [2] (2 expected)"),
        "rows differ between inputs": (
            with_tensor(infer(two), "amount", datatype="FP64", shape=[1],
                        contents=Contents(fp64_contents=[1.0])),
            f"input 'amount' has 1 rows, input '{infer(two).inputs[0].name}' has 2"),
        "nan": (
            with_tensor(infer(two), "amount", datatype="FP64", shape=[2],
                        contents=Contents(fp64_contents=[1.0, float("nan")])),
            "input 'amount' must be finite, got nan at row 1"),
        "missing field": (missing,
                          f"input 'amount' is missing: the model takes one tensor per field "
                          f"({fields})"),
        "unknown datatype": (
            with_tensor(infer(one), "amount", datatype="FLOAT", shape=[1]),
            "input 'amount' has unknown datatype 'FLOAT'"),
        "matrix of the wrong width": (
            pb.ModelInferRequest(model_name="fraud", inputs=[matrix_tensor(np.ones((1, 5)))]),
            f"input 'input-0' has shape [1, 5]; the model takes a feature matrix of shape "
            f"[n, {n}]"),
        "matrix of integers": (
            pb.ModelInferRequest(model_name="fraud", inputs=[Tensor(
                name="input-0", datatype="INT64", shape=[1, n],
                contents=Contents(int64_contents=[1] * n))]),
            "input 'input-0' is INT64; a feature matrix must be FP32 or FP64"),
        "inf in a matrix": (
            pb.ModelInferRequest(model_name="fraud", inputs=[matrix_tensor(
                np.array([[1.0] * (n - 1) + [float("inf")]]))]),
            f"input 'input-0' must be finite, got inf at row 0, column {n - 1}"),
        "too many rows": (
            pb.ModelInferRequest(
                model_name="fraud",
                inputs=[Tensor(name="input-0", datatype="FP32", shape=[MAX_ROWS + 1, n])],
                raw_input_contents=[np.zeros((MAX_ROWS + 1, n), dtype="<f4").tobytes()]),
            f"input 'input-0' has {MAX_ROWS + 1} rows, more than the {MAX_ROWS} one call may "
            "carry (use batch scoring)"),
        "raw bytes not a whole number of values": (
            pb.ModelInferRequest(
                model_name="fraud", inputs=[Tensor(name="input-0", datatype="FP32",
                                                   shape=[1, n])],
                raw_input_contents=[b"\x00" * (4 * n + 2)]),
            f"input 'input-0' has {4 * n + 2} raw bytes, not a whole number of FP32 values"),
        "raw contents for some inputs only": (
            pb.ModelInferRequest(model_name="fraud", inputs=field_tensors(one),
                                 raw_input_contents=[b""]),
            f"raw_input_contents has 1 entries for {len(one[0])} inputs; it needs one per "
            "input"),
        "an unknown output": (
            infer(one, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="proba")]),
            "output 'proba' is not an output of the model (predict_proba, predict)"),
    }


BAD_CASES = ["wrong datatype", "text as a number", "values do not fill the shape",
             "rows differ between inputs", "nan", "missing field", "unknown datatype",
             "matrix of the wrong width", "matrix of integers", "inf in a matrix",
             "too many rows", "raw bytes not a whole number of values",
             "raw contents for some inputs only", "an unknown output"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_invalid_argument_naming_the_tensor(
        world: ScoringWorld, stub: Any, case: str) -> None:
    request, message = bad_field_requests(world)[case]
    assert status_of(lambda: stub.ModelInfer(request, timeout=5)) == (
        grpc.StatusCode.INVALID_ARGUMENT, message)
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready  # still serving
