"""The Open Inference Protocol (KServe V2) over gRPC, on the same core as Scoring.

``InferenceServicer`` implements ``inference.GRPCInferenceService`` so standard clients of
that protocol (tritonclient, MLServer's and KServe's) can call the scoring service. The
model name is the router's (the pipeline config's name); ``model_version`` is a version or
alias, empty for the serving chain (with its fallbacks). ``ModelInfer`` takes either

- one tensor per raw field, named after the field (MLServer's pandas-codec style), shape
  ``[n]`` or ``[n, 1]``: the rows go through the answering model's own fitted feature set
  (``transform_online``) with no Redis read, so aggregates the request does not carry
  are those of an entity with no past; or
- one 2-D FP32/FP64 tensor of the model's own features (``n x n_features``), named
  anything but a field, predicted as it is (the work of MLServer's scikit-learn runtime).

Values come in ``contents`` or in ``raw_input_contents`` (little-endian, row-major; BYTES
elements each prefixed by a 4-byte little-endian length). The outputs are
``predict_proba`` (FP64 ``[n, classes]``) and ``predict`` (BYTES labels ``[n]``), answered
raw when the request was raw; ``parameters`` say whether a fallback answered. A bad
tensor is INVALID_ARGUMENT naming it. Example::

    stub = GRPCInferenceServiceStub(channel)
    matrix = InferInputTensor(name="input-0", datatype="FP32", shape=[1, 20],
                              contents=InferTensorContents(fp32_contents=row))
    reply = stub.ModelInfer(ModelInferRequest(model_name="fraud", inputs=[matrix]))
    reply.model_version, reply.outputs[0].contents.fp64_contents   # "v3", [0.97, 0.03]
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import grpc
import numpy as np

from common.errors import InvalidInput, NotFound
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from scoring.core import InferResult, ScoringCore
from scoring.grpc_common import MAX_ROWS, check_length, grpc_errors, remaining_deadline
from scoring.inputs import InputSchema
from scoring.metrics import ScoringMetrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "conveyor"
PLATFORM = "conveyor-sklearn"
OUTPUTS = ("predict_proba", "predict")
"""Rows one ModelInfer may carry (larger inputs: offline batch scoring)."""

NUMERIC = {"BOOL": "?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
           "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
           "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
"""numpy dtype of each numeric datatype's raw (little-endian) elements."""
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
            "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
            "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
            "BYTES": "bytes_contents"}
"""The InferTensorContents field of each datatype (FP16 has none: raw only)."""
NUMBERS = {name for name in NUMERIC if name != "BOOL"}
FIELD_DATATYPES = {"number": NUMBERS, "text": {"BYTES"}, "flag": {"BOOL"},
                   "time": {"BYTES", *NUMBERS}}
"""Datatypes a raw field of each kind accepts (times as ISO text or a number)."""
ADVERTISED = {"number": "FP64", "text": "BYTES", "flag": "BOOL", "time": "BYTES"}
MATRIX_DATATYPES = ("FP32", "FP64")


class InvalidTensor(InvalidInput):
    """One input tensor (or requested output) is malformed; the message names it."""

    def __init__(self, name: str, problem: str, *, kind: str = "input"):
        self.name, self.problem = name, problem
        super().__init__(f"{kind} '{name}' {problem}")


@dataclass(frozen=True)
class Tensor:
    """A decoded input: its name, datatype, shape and flat values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray | list[bytes]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over a ``ScoringCore``."""

    def __init__(self, core: ScoringCore, metrics: ScoringMetrics | None = None) -> None:
        self.core, self.metrics = core, metrics or ScoringMetrics()

    @grpc_errors
    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
                   ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
                    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    @grpc_errors
    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext
                   ) -> pb.ModelReadyResponse:
        self._check_name(request.name)
        if check_length("version", request.version):
            self.core.router.get(request.version)  # deployed means loaded and warmed up
            return pb.ModelReadyResponse(ready=True)
        return pb.ModelReadyResponse(ready=self.core.ready)

    @grpc_errors
    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
                       ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_package_version())

    @grpc_errors
    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
                      ) -> pb.ModelMetadataResponse:
        self._check_name(request.name)
        model = self.core.loaded(check_length("version", request.version) or None)
        return pb.ModelMetadataResponse(
            name=self.core.router.name, versions=self.core.router.versions(),
            platform=PLATFORM, inputs=input_metadata(model.schema),
            outputs=output_metadata(model.classes))

    @grpc_errors
    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext
                   ) -> pb.ModelInferResponse:
        self._check_name(request.model_name)
        check_length("model_version", request.model_version)
        outputs = requested_outputs(request)
        model = self.core.loaded(request.model_version or None)
        rows = model_rows(decode_inputs(request), model.schema, len(model.feature_names))
        result = self.core.infer(rows, request.model_version or None,
                                 remaining_deadline(self.core, context),
                                 check_length("id", request.id))
        self.metrics.observe_inference(result)
        return infer_response(request, result, outputs)

    def _check_name(self, name: str) -> None:
        if check_length("model name", name) != self.core.router.name:
            raise NotFound("model", name or "''")


# -- decoding inputs ---------------------------------------------------------------------


def decode_inputs(request: pb.ModelInferRequest) -> list[Tensor]:
    """Every input tensor, from ``contents`` or ``raw_input_contents``."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for "
                           f"{len(request.inputs)} inputs; it needs one per input")
    if not request.inputs:
        raise InvalidInput("the request has no inputs")
    return [_decode(tensor, raw[i] if raw else None) for i, tensor in enumerate(request.inputs)]


def _decode(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    name, datatype = check_length("input name", tensor.name), tensor.datatype
    if datatype not in NUMERIC and datatype != "BYTES":
        raise InvalidTensor(name, f"has unknown datatype '{datatype}'")
    shape = tuple(int(d) for d in tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise InvalidTensor(name, f"has an invalid shape {list(shape)}")
    if raw is not None and tensor.HasField("contents"):
        raise InvalidTensor(name, "has both contents and raw_input_contents")
    values = _raw_values(name, datatype, raw) if raw is not None else _contents(tensor)
    expected = math.prod(shape)
    if expected > MAX_ROWS * 1024:
        raise InvalidTensor(name, f"has {expected} values, more than the "
                            f"{MAX_ROWS * 1024} allowed")
    if len(values) != expected:
        raise InvalidTensor(name, f"has {len(values)} values for shape {list(shape)} "
                            f"({expected} expected)")
    return Tensor(name, datatype, shape, values)


def _contents(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray | list[bytes]:
    if tensor.datatype == "FP16":
        raise InvalidTensor(tensor.name, "is FP16, which only raw_input_contents can carry")
    values = getattr(tensor.contents, CONTENTS[tensor.datatype])
    if tensor.datatype == "BYTES":
        return list(values)
    return np.asarray(values, dtype=NUMERIC[tensor.datatype])


def _raw_values(name: str, datatype: str, raw: bytes) -> np.ndarray | list[bytes]:
    if datatype == "BYTES":
        return _raw_bytes(name, raw)
    dtype = np.dtype(NUMERIC[datatype])
    if len(raw) % dtype.itemsize:
        raise InvalidTensor(name, f"has {len(raw)} raw bytes, not a whole number of "
                            f"{datatype} values")
    return np.frombuffer(raw, dtype=dtype)


def _raw_bytes(name: str, raw: bytes) -> list[bytes]:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidTensor(name, f"has a truncated BYTES length at byte {at}")
        (size,) = struct.unpack_from("<I", raw, at)
        if at + 4 + size > len(raw):
            raise InvalidTensor(name, f"has a BYTES element of {size} bytes past the end")
        out.append(raw[at + 4: at + 4 + size])
        at += 4 + size
    return out


# -- tensors to model rows ---------------------------------------------------------------


def model_rows(
    tensors: Sequence[Tensor], schema: InputSchema, n_features: int
) -> np.ndarray | list[dict[str, Any]]:
    """A feature matrix (one tensor that is not a field) or raw records (field tensors)."""
    fields = {*schema.kinds, *schema.aggregate_columns}
    if len(tensors) == 1 and tensors[0].name not in fields:
        return feature_matrix(tensors[0], n_features)
    return field_records(tensors, schema)


def feature_matrix(tensor: Tensor, n_features: int) -> np.ndarray:
    """The model's feature matrix: FP32/FP64, shape [n, n_features], finite."""
    if tensor.datatype not in MATRIX_DATATYPES:
        raise InvalidTensor(tensor.name, f"is {tensor.datatype}; a feature matrix must be "
                            f"{' or '.join(MATRIX_DATATYPES)}")
    if len(tensor.shape) != 2 or tensor.shape[1] != n_features:
        raise InvalidTensor(tensor.name, f"has shape {list(tensor.shape)}; the model takes a "
                            f"feature matrix of shape [n, {n_features}]")
    _check_rows(tensor.name, tensor.shape[0])
    matrix = np.asarray(tensor.values, dtype=np.float64).reshape(tensor.shape)
    finite = np.isfinite(matrix)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise InvalidTensor(tensor.name, f"must be finite, got {matrix[row, column]} at "
                            f"row {row}, column {column}")
    return matrix


def field_records(tensors: Sequence[Tensor], schema: InputSchema) -> list[dict[str, Any]]:
    """One raw record per row from one tensor per field, each checked against its kind."""
    by_name = {tensor.name: tensor for tensor in tensors}
    for name in sorted(schema.kinds):
        if name not in by_name:
            raise InvalidTensor(name, f"is missing: the model takes one tensor per field "
                                f"({', '.join(sorted(schema.kinds))})")
    rows = _common_rows(tensors)
    known = {*schema.kinds, *schema.aggregate_columns}
    columns = {t.name: _field_values(t, schema.kinds.get(t.name, "number"), known)
               for t in tensors}
    entity = schema.entity_key
    return [{**{name: values[i] for name, values in columns.items()},
             **({entity: f"v2-row-{i}"} if entity else {})} for i in range(rows)]


def _common_rows(tensors: Sequence[Tensor]) -> int:
    first = tensors[0]
    for tensor in tensors:
        if len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise InvalidTensor(tensor.name, f"has shape {list(tensor.shape)}; a field "
                                "tensor is [n] or [n, 1]")
        if tensor.shape[0] != first.shape[0]:
            raise InvalidTensor(tensor.name, f"has {tensor.shape[0]} rows, input "
                                f"'{first.name}' has {first.shape[0]}")
    _check_rows(first.name, first.shape[0])
    return first.shape[0]


def _field_values(tensor: Tensor, kind: str, known: set[str]) -> list[Any]:
    if tensor.name not in known:
        raise InvalidTensor(tensor.name, f"is not a field of the model (fields: "
                            f"{', '.join(sorted(known))})")
    if tensor.datatype not in FIELD_DATATYPES[kind]:
        allowed = ", ".join(sorted(FIELD_DATATYPES[kind]))
        raise InvalidTensor(tensor.name, f"is {tensor.datatype}; the field is a {kind} "
                            f"({allowed})")
    if tensor.datatype == "BYTES":
        return [_text(tensor.name, value, i) for i, value in enumerate(tensor.values)]
    values = np.asarray(tensor.values)
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise InvalidTensor(tensor.name, f"must be finite, got {values[bad[0]]} at "
                                f"row {bad[0]}")
    return values.tolist()


def _text(name: str, value: bytes, row: int) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidTensor(name, f"is not UTF-8 text at row {row}") from None


def _check_rows(name: str, rows: int) -> None:
    if rows == 0:
        raise InvalidTensor(name, "has no rows")
    if rows > MAX_ROWS:
        raise InvalidTensor(name, f"has {rows} rows, more than the {MAX_ROWS} one call "
                            "may carry (use batch scoring)")


# -- outputs and metadata ----------------------------------------------------------------


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    """The outputs asked for (all when none is named); an unknown one is refused."""
    names = [output.name for output in request.outputs] or list(OUTPUTS)
    for name in names:
        if check_length("output name", name) not in OUTPUTS:
            raise InvalidTensor(name, f"is not an output of the model ({', '.join(OUTPUTS)})",
                                kind="output")
    return names


def infer_response(request: pb.ModelInferRequest, result: InferResult,
                   outputs: Sequence[str]) -> pb.ModelInferResponse:
    """The response: the asked outputs, raw if the request was raw; fallback parameters;
    the call's id (the request's, or the one made up for it)."""
    proba = np.asarray(result.probabilities, dtype=np.float64)
    labels = [result.classes[i].encode() for i in np.argmax(proba, axis=1)]
    raw = bool(request.raw_input_contents)
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=result.version, id=result.request_id,
        parameters=_parameters(result))
    for name in outputs:
        tensor = response.outputs.add(name=name)
        if name == "predict_proba":
            _fill(tensor, "FP64", list(proba.shape), proba.ravel(), response, raw)
        else:
            _fill(tensor, "BYTES", [len(labels)], labels, response, raw)
    return response


def _fill(tensor: Any, datatype: str, shape: list[int], values: Any,
          response: pb.ModelInferResponse, raw: bool) -> None:
    tensor.datatype = datatype
    tensor.shape.extend(shape)
    if not raw:
        getattr(tensor.contents, CONTENTS[datatype]).extend(values)
    elif datatype == "BYTES":
        response.raw_output_contents.append(
            b"".join(struct.pack("<I", len(v)) + v for v in values))
    else:
        response.raw_output_contents.append(np.asarray(values, dtype="<f8").tobytes())


def _parameters(result: InferResult) -> dict[str, pb.InferParameter]:
    params = {"fallback": pb.InferParameter(bool_param=result.fallback)}
    if result.fallback_reason:
        params["fallback_reason"] = pb.InferParameter(string_param=result.fallback_reason)
    return params


def input_metadata(schema: InputSchema) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """One tensor per raw field, with the datatype of its kind, shape [-1]."""
    meta = pb.ModelMetadataResponse.TensorMetadata
    return [meta(name=name, datatype=ADVERTISED[kind], shape=[-1])
            for name, kind in sorted(schema.kinds.items())]


def output_metadata(classes: Sequence[str]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """predict_proba [-1, classes] and predict [-1]."""
    meta = pb.ModelMetadataResponse.TensorMetadata
    return [meta(name="predict_proba", datatype="FP64", shape=[-1, len(classes)]),
            meta(name="predict", datatype="BYTES", shape=[-1])]


def _package_version() -> str:
    try:
        return metadata.version("conveyor")
    except metadata.PackageNotFoundError:
        return "unknown"


def field_tensors(records: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Field tensors of raw records (clients, tests): numbers FP64, flags BOOL, else BYTES."""
    tensor = pb.ModelInferRequest.InferInputTensor
    out = []
    for name in records[0]:
        values = [record[name] for record in records]
        out.append(_field_tensor(tensor, name, values))
    return out


def _field_tensor(tensor: Any, name: str, values: list[Any]) -> Any:
    contents = pb.InferTensorContents
    shape = [len(values)]
    if all(isinstance(v, bool) for v in values):
        return tensor(name=name, datatype="BOOL", shape=shape,
                      contents=contents(bool_contents=values))
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return tensor(name=name, datatype="FP64", shape=shape,
                      contents=contents(fp64_contents=values))
    return tensor(name=name, datatype="BYTES", shape=shape,
                  contents=contents(bytes_contents=[str(v).encode() for v in values]))
