"""What every gRPC servicer of scoring shares: the one table from ``common.errors.Status``
to ``grpc.StatusCode`` (``grpc_errors``) and the request's deadline (``remaining_deadline``).

Both servicers (``scoring/server.py``'s Scoring and ``scoring/oip.py``'s Open Inference
Protocol) stand on this module, so neither imports the other. ``Limits`` bound what one
call may carry (rows, id and text lengths, fields), each refused as INVALID_ARGUMENT naming
what is too long; ``check_listen`` refuses an open listen address without tokens, or
tokens over plaintext, unless a setting allows it. Example::

    class Servicer:
        @grpc_errors                      # ConveyorError -> its code; anything else INTERNAL
        def Score(self, request, context):
            deadline_s = remaining_deadline(self.core, context)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from common.errors import ConveyorError, InvalidInput, Status
from scoring.core import ScoringCore
from scoring.security import ServerSecurity

logger = logging.getLogger(__name__)

GRPC_CODES: dict[Status, grpc.StatusCode] = {
    Status.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Status.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Status.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Status.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Status.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Status.INTERNAL: grpc.StatusCode.INTERNAL,
}
Handler = TypeVar("Handler", bound=Callable[..., Any])
MAX_ROWS = 4096
"""Rows one ScoreBatch or ModelInfer call may carry."""
MAX_ID_CHARS = 256
"""Longest entity id, request id, model version or field name."""
MAX_TEXT_CHARS = 4096
"""Longest text value of a field."""
MAX_FIELDS = 512
"""Most fields of one row."""
MAX_DETAILS_BYTES = 1024
"""Longest error message a call is answered with, in UTF-8 bytes: gRPC percent-encodes it
into a header (up to 3 bytes a byte), and a client drops a status whose headers pass its
8 KB limit, seeing RESOURCE_EXHAUSTED 'Stream removed' instead (found by ``make fuzz``)."""
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost", "[::1]")


def check_length(what: str, value: str, limit: int = MAX_ID_CHARS) -> str:
    """``value`` if it is at most ``limit`` characters, else INVALID_ARGUMENT naming it.

    >>> check_length("entity_id", "C-42")
    'C-42'
    """
    if len(value) > limit:
        raise InvalidInput(f"{what} is {len(value)} characters long, more than the {limit} "
                           "allowed")
    return value


def capped(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """``message`` cut to ``limit`` UTF-8 bytes (at a character's edge), saying so.

    >>> capped("é" * 10, limit=5)  # 2 bytes each: the third would not fit whole
    'éé... (cut: 16 bytes more)'
    """
    encoded = message.encode("utf-8", errors="replace")
    if len(encoded) <= limit:
        return message
    kept = encoded[:limit].decode("utf-8", errors="ignore")
    return f"{kept}... (cut: {len(encoded) - len(kept.encode())} bytes more)"


def check_count(what: str, count: int, limit: int) -> None:
    """INVALID_ARGUMENT naming ``what`` when ``count`` is over ``limit``."""
    if count > limit:
        raise InvalidInput(f"{what}: {count}, more than the {limit} one call may carry")


class InsecureListen(ConveyorError):
    """The server would take calls from other hosts without authentication, or tokens
    over plaintext, and no setting allows it."""

    status = Status.INVALID_ARGUMENT


def check_listen(host: str, security: ServerSecurity, *, allowed: bool) -> str | None:
    """Why listening on ``host`` with ``security`` is unsafe (None: it is safe). Raises
    ``InsecureListen`` naming the settings unless ``allowed`` (then the caller warns)."""
    problem = None
    if security.tokens and not security.tls:
        problem = ("bearer tokens would travel in plaintext: set CONVEYOR_GRPC_TLS_CERT and "
                   "CONVEYOR_GRPC_TLS_KEY")
    elif host not in LOOPBACK_HOSTS and not security.tokens:
        problem = (f"the gRPC server listens on {host} without authentication: set "
                   "CONVEYOR_GRPC_AUTH_TOKENS (and TLS), or CONVEYOR_GRPC_HOST=127.0.0.1")
    if problem and not allowed:
        raise InsecureListen(f"{problem}; CONVEYOR_GRPC_ALLOW_INSECURE=true allows it "
                             "(a private network that is trusted)")
    return problem


def grpc_errors(method: Handler) -> Handler:
    """Abort the RPC with the gRPC code of a ``ConveyorError``'s status, and its message
    (``capped``: a value echoed in it never makes the status too large to be delivered).

    Anything else is a bug: logged with its traceback, answered INTERNAL.
    """

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ConveyorError as exc:
            context.abort(GRPC_CODES[exc.status], capped(str(exc)))
        except Exception as exc:
            logger.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    return wrapper  # type: ignore[return-value]


NO_DEADLINE_S = 1e12
"""What gRPC's server says is left of a call that has no deadline is its 'infinite future'
(about 9.2e18 s) less now; anything past this (some 30,000 years) is no deadline."""


def remaining_deadline(core: ScoringCore, context: grpc.ServicerContext) -> float:
    """What the client has left of its deadline (at most the core's ``max_deadline_s``),
    or the core's ``deadline_s`` if it set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_S:
        return core.settings.deadline_s
    return max(0.0, min(core.settings.max_deadline_s, remaining))
