"""The ``conveyor`` command line: run services, publish events, inspect queues.

Examples::

    conveyor run eventlog
    conveyor publish SourceDataAvailable --json '{"dataset": "paysim", "uri": "tx.csv"}'
    conveyor publish outcome --entity C42 --outcome 1 --request-id 3f9a...
    conveyor publish records --dataset paysim --file tx.jsonl
    conveyor events schema SourceDataAvailable
    conveyor dlq list eventlog
    conveyor status
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any

import click
import redis

from app.console import (
    bearer_metadata,
    broker_reachable,
    model_table,
    queue_table,
    redis_reachable,
    rpc_error_text,
    scoring_channel,
)
from app.services import build_service
from common.bus.rabbitmq import RabbitMQBus
from common.errors import ConveyorError
from common.eventlog import EventLog, summary
from common.events import event_class, json_schemas, parse_event
from common.lineage import trace
from common.logs import configure_logging
from common.runtime import ServiceRunner, redis_processed, stop_on_signals
from common.settings import Settings


class ConveyorGroup(click.Group):
    """Turns Conveyor errors into one clear line and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConveyorError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=ConveyorGroup)
def main() -> None:
    """Conveyor: an event-driven machine-learning pipeline."""


@main.command()
@click.argument("service")
def run(service: str) -> None:
    """Run one service until SIGTERM (what each Kubernetes Deployment runs)."""
    settings = Settings()
    try:
        built = build_service(service, settings)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="SERVICE") from exc
    configure_logging(settings.log_level)
    stop = threading.Event()
    stop_on_signals(stop)
    runner = ServiceRunner(built, RabbitMQBus(settings, name=service), settings,
                           processed=redis_processed(settings))
    runner.run(stop)


@main.command()
def up() -> None:
    """Start every service not running yet as a local process; Ctrl-C stops them."""
    from contextlib import ExitStack

    from app.local import start_missing_services

    settings = Settings()
    if not (broker_reachable(settings) and redis_reachable(settings)):
        raise click.ClickException("RabbitMQ or Redis is not reachable: run scripts/setup.sh")
    stop = threading.Event()
    stop_on_signals(stop)
    logs = Path("var/run")
    logs.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        bus = stack.enter_context(contextlib.closing(RabbitMQBus(settings, name="up")))
        start_missing_services(settings, bus, stack, logs, click.echo)
        click.echo("all services up; Ctrl-C or SIGTERM stops the ones started here")
        stop.wait()


class PublishGroup(click.Group):
    """``publish outcome ...``, or ``publish EVENT_TYPE --json ...`` for any event type."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands:
            return "event", self.commands["event"], args  # the type stays an argument
        return super().resolve_command(ctx, args)


@main.group(cls=PublishGroup)
def publish() -> None:
    """Publish an event: EVENT_TYPE --json '{...}', or an observed outcome."""


@publish.command("event")
@click.argument("event_type")
@click.option("--json", "payload", required=True, help="Payload fields as JSON, or @file.")
def publish_event(event_type: str, payload: str) -> None:
    """Publish an event (envelope fields are filled in unless given)."""
    fields = _load_json(payload)
    event = parse_event({"producer": "cli", **fields, "event_type": event_class(event_type)
                         .model_fields["event_type"].default})
    bus = RabbitMQBus(Settings(), name="cli")
    try:
        bus.publish(event)
    finally:
        bus.close()
    click.echo(f"published {event.event_type} {event.event_id} (confirmed by the broker)")


@publish.command("records")
@click.option("--dataset", required=True, help="The dataset the records belong to.")
@click.option("--file", "path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A .jsonl or .csv file of records, oldest first.")
@click.option("--batch", default=500, show_default=True, help="Records per event.")
def publish_records(dataset: str, path: str, batch: int) -> None:
    """Publish records as they happen (RecordsObserved), for the online path."""
    from ingestion.records import read_records_file, records_events

    events = records_events(dataset, read_records_file(path), batch_size=batch, producer="cli")
    bus = RabbitMQBus(Settings(), name="cli")
    try:
        bus.publish_many(events)
    finally:
        bus.close()
    count = sum(len(e.records) for e in events)
    click.echo(f"published {count} records of {dataset} in {len(events)} RecordsObserved "
               "event(s) (confirmed by the broker)")


@publish.command("outcome")
@click.option("--entity", default="", help="The entity whose outcome is known (needed "
              "without --request-id).")
@click.option("--outcome", required=True, help="The observed outcome (a label or a number).")
@click.option("--request-id", default=None, help="The request id of the score it judges "
              "(default: the entity's latest score; a ModelInfer row's: <id> or <id>/<row>).")
def publish_outcome(entity: str, outcome: str, request_id: str | None) -> None:
    """Publish an observed outcome, joined by monitoring to the score it judges."""
    from monitoring.outcomes import publish_outcome as publish_one

    if not entity and not request_id:
        raise click.UsageError("give --entity or --request-id: the outcome must name the "
                               "score it judges")
    event = publish_one(Settings(), entity, outcome_value(outcome), request_id, producer="cli")
    click.echo(f"published OutcomeObserved {event.event_id} (confirmed by the broker)")


def outcome_value(text: str) -> str | float:
    """A finite number where the text reads as one ("1" and "1.0" -> 1.0), else the text."""
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _load_json(text: str) -> dict[str, Any]:
    raw = open(text[1:]).read() if text.startswith("@") else text  # noqa: SIM115
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--json") from exc
    if not isinstance(data, dict):
        raise click.BadParameter("expected a JSON object", param_hint="--json")
    return data


@main.group()
def events() -> None:
    """Event schemas and the event log."""


@events.command("schema")
@click.argument("event_type", required=False)
def events_schema(event_type: str | None) -> None:
    """Print the JSON Schema of one event type, or of all of them."""
    schemas = json_schemas()
    if event_type:
        schemas = {event_type: event_class(event_type).model_json_schema()}
    click.echo(json.dumps(schemas, indent=2))


@events.command("log")
@click.option("--limit", default=50, show_default=True, help="How many recent events.")
def events_log(limit: int) -> None:
    """Print the latest events recorded by the eventlog service."""
    settings = Settings()
    log = EventLog(redis.Redis.from_url(settings.redis_url), settings.namespace)
    for entry in log.recent(limit):
        click.echo(format_log_entry(entry))


def format_log_entry(entry: dict[str, str]) -> str:
    """One event-log entry as a line."""
    return (f"{entry['occurred_at'][:23]}  {entry['event_type']:<22} {entry['event_id']}  "
            f"by {entry['producer']:<10} run {entry['correlation_id'][:8]}  {entry['payload']}")


@main.command()
@click.argument("ident")
def lineage(ident: str) -> None:
    """Walk from a model, feature set, batch or event back to its source and forward."""
    settings = Settings()
    found = trace(EventLog(redis.Redis.from_url(settings.redis_url), settings.namespace), ident)
    click.echo(f"lineage of {ident} (run {found.subject.correlation_id})")
    click.echo("came from:")
    for event in found.ancestors:
        click.echo("  " + format_log_entry(summary(event)))
    click.echo("  > " + format_log_entry(summary(found.subject)))
    click.echo("led to:")
    for depth, event in found.descendants:
        click.echo("  " + "  " * depth + format_log_entry(summary(event)))


@main.command()
@click.option("--entity", required=True, help="The entity id (the feature set's entity key).")
@click.option("--field", "fields", multiple=True, metavar="NAME=VALUE",
              help="A raw field of the request; repeat for each field.")
@click.option("--model-version", default="", help="A version or alias; default: the chain.")
@click.option("--target", default="127.0.0.1:50051", show_default=True,
              help="Address of the scoring service.")
@click.option("--timeout", default=2.0, show_default=True, help="Deadline in seconds.")
@click.option("--token", default=None,
              help="Bearer token, when the service requires one [default: setting "
                   "CONVEYOR_GRPC_TOKEN].")
@click.option("--tls-ca", default=None, type=click.Path(exists=True, dir_okay=False),
              help="PEM CA of the service's certificate: connect with TLS [default: setting "
                   "CONVEYOR_GRPC_TLS_CA].")
def score(entity: str, fields: tuple[str, ...], model_version: str, target: str,
          timeout: float, token: str | None, tls_ca: str | None) -> None:
    """Score one entity over gRPC and print the answer."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from protos.conveyor.scoring.v1 import scoring_pb2 as pb
    from protos.conveyor.scoring.v1 import scoring_pb2_grpc
    from scoring.server import field_value

    settings = Settings()
    token = settings.grpc_token.get_secret_value() if token is None else token
    request = pb.ScoreRequest(entity_id=entity, model_version=model_version, fields={
        name: field_value(value) for name, value in map(parse_field, fields)})
    with scoring_channel(target, tls_ca or settings.grpc_tls_ca) as channel:
        try:
            reply = scoring_pb2_grpc.ScoringStub(channel).Score(
                request, timeout=timeout, metadata=bearer_metadata(token))
        except grpc.RpcError as exc:
            raise click.ClickException(rpc_error_text(exc)) from exc
    click.echo(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))


def parse_field(text: str) -> tuple[str, bool | int | float | str]:
    """``name=value`` with the value read as a bool, an int, a float, or else text."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"expected NAME=VALUE, got {text!r}", param_hint="--field")
    if raw.lower() in ("true", "false"):
        return name, raw.lower() == "true"
    for kind in (int, float):
        try:
            return name, kind(raw)
        except ValueError:
            pass
    return name, raw


@main.group()
def dlq() -> None:
    """Inspect and replay dead letters."""


@dlq.command("list")
@click.argument("service")
@click.option("--limit", default=20, show_default=True)
@click.option("--traceback", "show_traceback", is_flag=True, help="Show each traceback.")
def dlq_list(service: str, limit: int, show_traceback: bool) -> None:
    """Show a service's dead letters with their errors (they stay in the queue)."""
    bus = RabbitMQBus(Settings(), name="cli")
    letters = bus.dead_letters(service, limit)
    click.echo(f"{len(letters)} dead letter(s) shown for {service}")
    for letter in letters:
        click.echo(f"- [{letter.routing_key}] {letter.error}")
        click.echo(f"    body: {letter.body[:200].decode(errors='replace')}")
        if show_traceback:
            click.echo(str(letter.headers.get("x-conveyor-traceback", "")))


@dlq.command("replay")
@click.argument("service")
def dlq_replay(service: str) -> None:
    """Put a service's dead letters back in its queue with fresh attempts."""
    bus = RabbitMQBus(Settings(), name="cli")
    try:
        count = bus.replay_dead_letters(service)
    finally:
        bus.close()
    click.echo(f"replayed {count} dead letter(s) to {service}")


@main.command()
def status() -> None:
    """Reachability, queue depths, dead letters, and how each model serves (monitoring)."""
    settings = Settings()
    broker_ok, redis_ok = broker_reachable(settings), redis_reachable(settings)
    click.echo(f"RabbitMQ {settings.amqp_url.split('@')[-1]}: {'up' if broker_ok else 'DOWN'}")
    click.echo(f"Redis    {settings.redis_url}: {'up' if redis_ok else 'DOWN'}")
    if redis_ok:
        from common.redis_memory import redis_memory

        memory = redis_memory(redis.Redis.from_url(settings.redis_url))
        click.echo(f"Redis memory: {memory.describe()}")
    if broker_ok:
        with contextlib.closing(RabbitMQBus(settings, name="cli")) as bus:
            click.echo(queue_table(bus))
    if redis_ok:
        from monitoring.state import MonitoringState

        state = MonitoringState(redis.Redis.from_url(settings.redis_url), settings.namespace)
        click.echo(model_table(state.live_all()))
    sys.exit(0 if broker_ok and redis_ok else 1)


@main.command()
@click.option("--rows", default=200_000, show_default=True, help="Transactions to generate.")
@click.option("--seed", type=int, default=None, help="Data seed (default: a fresh one).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the run.")
def demo(rows: int, seed: int | None, timeout: float) -> None:
    """The whole story on a generated PaySim-style data set, through the real services."""
    from app.demo import run_demo

    # The demo is local development (its services inherit this): the published signing
    # key is allowed here, and only here, unless CONVEYOR_LOCAL_DEV says otherwise.
    os.environ.setdefault("CONVEYOR_LOCAL_DEV", "true")
    sys.exit(run_demo(Settings(), rows=rows, seed=seed, timeout=timeout))


if __name__ == "__main__":
    main()
