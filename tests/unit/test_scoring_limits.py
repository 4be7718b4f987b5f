"""What one gRPC call may carry, and where the server may listen (scoring/grpc_common.py)."""

from __future__ import annotations

import pytest

from common.errors import InvalidInput
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from scoring.grpc_common import (
    MAX_DETAILS_BYTES,
    MAX_FIELDS,
    MAX_ID_CHARS,
    MAX_TEXT_CHARS,
    InsecureListen,
    capped,
    check_listen,
)
from scoring.security import ServerSecurity
from scoring.server import to_query

TLS = ServerSecurity(tokens=("t0ken",), cert=b"cert", key=b"key")


def request(**overrides: object) -> pb.ScoreRequest:
    fields = {"amount": pb.FieldValue(number=9.5), "kind": pb.FieldValue(text="CASH_OUT")}
    return pb.ScoreRequest(**{"entity_id": "C-42", "fields": fields, **overrides})


def test_a_request_within_the_limits_is_a_query() -> None:
    query = to_query(request(model_version="v" * MAX_ID_CHARS))
    assert (query.entity_id, query.fields["kind"], len(query.model_version or "")) == (
        "C-42", "CASH_OUT", MAX_ID_CHARS)


@pytest.mark.parametrize(("overrides", "named"), [
    ({"entity_id": "C" * (MAX_ID_CHARS + 1)}, "entity_id is 257 characters long"),
    ({"request_id": "r" * (MAX_ID_CHARS + 1)}, "request_id is 257 characters long"),
    ({"model_version": "v" * (MAX_ID_CHARS + 1)}, "model_version is 257 characters long"),
    ({"fields": {"x" * (MAX_ID_CHARS + 1): pb.FieldValue(number=1.0)}},
     "field name is 257 characters long"),
    ({"fields": {"kind": pb.FieldValue(text="k" * (MAX_TEXT_CHARS + 1))}},
     "field 'kind' is 4097 characters long"),
    ({"fields": {f"f{i}": pb.FieldValue(number=1.0) for i in range(MAX_FIELDS + 1)}},
     "fields: 513, more than the 512"),
])
def test_a_request_over_a_limit_is_refused_naming_it(overrides: dict[str, object],
                                                     named: str) -> None:
    with pytest.raises(InvalidInput, match=named):
        to_query(request(**overrides))


def test_an_error_message_is_capped_in_bytes_at_a_characters_edge() -> None:
    assert capped("model fraud with version v9 not found") == (
        "model fraud with version v9 not found")  # short: as it is
    message = capped("model fraud with version " + "\U0001f600" * 4000 + " not found")
    assert len(message.encode()) <= MAX_DETAILS_BYTES + 40
    assert message.startswith("model fraud with version \U0001f600")
    assert message.endswith(f"... (cut: {25 + 4 * 4000 + 10 - 1021} bytes more)")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_without_tokens_is_safe(host: str) -> None:
    assert check_listen(host, ServerSecurity(), allowed=False) is None


def test_every_interface_needs_tokens_and_tokens_need_tls() -> None:
    assert check_listen("0.0.0.0", TLS, allowed=False) is None
    with pytest.raises(InsecureListen, match="listens on 0.0.0.0 without authentication"):
        check_listen("0.0.0.0", ServerSecurity(), allowed=False)
    with pytest.raises(InsecureListen, match="tokens would travel in plaintext"):
        check_listen("127.0.0.1", ServerSecurity(tokens=("t0ken",)), allowed=False)


def test_an_explicit_allowance_returns_the_problem_to_warn_about() -> None:
    problem = check_listen("10.0.0.7", ServerSecurity(), allowed=True)
    assert problem is not None and "10.0.0.7 without authentication" in problem
