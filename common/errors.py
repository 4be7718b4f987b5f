"""One error hierarchy for Conveyor; each error carries a transport-neutral status.

Edges (the bus runtime, the gRPC servicer, the CLI) map ``status`` to their own codes in
one table. Subclasses build their message from their arguments, as MLServer does::

    raise ModelNotFound("fraud", "v7")   # "model fraud with version v7 not found"
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Transport-neutral outcome classes, mapped to gRPC codes or HTTP statuses at the edge."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    PERMISSION_DENIED = "permission_denied"
    INTERNAL = "internal"


class ConveyorError(Exception):
    """Base of every Conveyor error."""

    status: Status = Status.INTERNAL


class InvalidInput(ConveyorError):
    """The input is at fault: retrying cannot help, so it is dead-lettered at once."""

    status = Status.INVALID_ARGUMENT


class InvalidEvent(InvalidInput):
    """A message that is not a valid event: bad JSON, unknown type, missing or bad field."""

    def __init__(self, problem: str, *, field: str | None = None, event_type: str | None = None):
        self.problem, self.field, self.event_type = problem, field, event_type
        where = f" in field '{field}'" if field else ""
        kind = f" {event_type}" if event_type else ""
        super().__init__(f"invalid event{kind}{where}: {problem}")


class PublishError(ConveyorError):
    """The broker did not take responsibility for an event."""

    status = Status.UNAVAILABLE


class Unroutable(PublishError):
    """No queue is bound to the event's routing key: the event would be silently dropped."""

    def __init__(self, event_type: str, exchange: str):
        self.event_type, self.exchange = event_type, exchange
        super().__init__(
            f"event {event_type} is unroutable on exchange {exchange}: no queue is bound to it"
        )


class NotFound(ConveyorError):
    """Something named by id does not exist."""

    status = Status.NOT_FOUND

    def __init__(self, kind: str, ident: str):
        self.kind, self.ident = kind, ident
        super().__init__(f"{kind} {ident} not found")


class ModelNotFound(NotFound):
    """A model name and version that the registry does not hold."""

    def __init__(self, name: str, version: str | None = None):
        self.name, self.version = name, version
        ConveyorError.__init__(self, f"model {name} with version {version} not found")
        self.kind, self.ident = "model", f"{name}:{version}"


class NotReady(ConveyorError):
    """Something another service is still producing: retrying later can succeed."""

    status = Status.UNAVAILABLE

    def __init__(self, what: str, waited_s: float):
        self.what, self.waited_s = what, waited_s
        super().__init__(f"{what} not ready after {waited_s:g} s")


class ArtifactSignatureError(ConveyorError):
    """A model artifact is unsigned or its signature does not match: it is never loaded."""

    status = Status.PERMISSION_DENIED

    def __init__(self, model_id: str, reason: str):
        self.model_id, self.reason = model_id, reason
        super().__init__(f"model artifact {model_id} refused: {reason}")


class ImmutableBatchError(ConveyorError):
    """A raw batch id already holds different content."""

    status = Status.INVALID_ARGUMENT


class ModelIdNotFound(ModelNotFound):
    """A model id that the model store or the registry does not hold."""

    def __init__(self, model_id: str):
        super().__init__(model_id)
        self.ident = model_id
        self.args = (f"model {model_id} not found",)
