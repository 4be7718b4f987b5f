"""What every gRPC servicer of scoring shares: the one table from ``common.errors.Status``
to ``grpc.StatusCode`` (``grpc_errors``) and the request's deadline (``remaining_deadline``).

Both servicers (``scoring/server.py``'s Scoring and ``scoring/oip.py``'s Open Inference
Protocol) stand on this module, so neither imports the other. Example::

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

from common.errors import ConveyorError, Status
from scoring.core import ScoringCore

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


def grpc_errors(method: Handler) -> Handler:
    """Abort the RPC with the gRPC code of a ``ConveyorError``'s status, and its message.

    Anything else is a bug: logged with its traceback, answered INTERNAL.
    """

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ConveyorError as exc:
            context.abort(GRPC_CODES[exc.status], str(exc))
        except Exception as exc:
            logger.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    return wrapper  # type: ignore[return-value]


def remaining_deadline(core: ScoringCore, context: grpc.ServicerContext) -> float:
    """The core's deadline, shortened to what the client has left (if it set one)."""
    remaining = context.time_remaining()
    default = core.settings.deadline_s
    return default if remaining is None else max(0.0, min(default, remaining))
