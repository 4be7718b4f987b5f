"""Console helpers shared by the command line and the demo: reachability checks, the
queue and model tables of ``conveyor status``, and the gRPC channel to the scoring service.

Example::

    if broker_reachable(settings) and redis_reachable(settings):
        print(queue_table(bus))
    with scoring_channel("127.0.0.1:50051") as channel:
        stub.Score(request, metadata=bearer_metadata(token))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import pika
import redis

from app.services import service_names
from common.bus.rabbitmq import RabbitMQBus, connection_parameters
from common.settings import Settings

if TYPE_CHECKING:
    import grpc

BROKER_CHECK_TIMEOUT_S = 5.0  # `conveyor status` calls a broker that has not answered by then down


def scoring_channel(target: str, tls_ca: str = "") -> grpc.Channel:
    """A channel to the scoring service: TLS trusting the PEM CA file ``tls_ca`` when one
    is named (``CONVEYOR_GRPC_TLS_CA``), else plain text."""
    import grpc

    if not tls_ca:
        return grpc.insecure_channel(target)
    try:
        ca = Path(tls_ca).read_bytes()
    except OSError as exc:
        raise click.ClickException(
            f"the TLS CA {tls_ca} (CONVEYOR_GRPC_TLS_CA) cannot be read ({exc.strerror})"
        ) from exc
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca))


def bearer_metadata(token: str) -> list[tuple[str, str]] | None:
    """The call metadata that carries ``token`` (``CONVEYOR_GRPC_TOKEN``); none without one."""
    return [("authorization", f"Bearer {token}")] if token else None


def rpc_error_text(exc: grpc.RpcError) -> str:
    """``CODE: details``, with what to set when the service wants a (valid) token."""
    import grpc

    text = f"{exc.code().name}: {exc.details()}"
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        text += " (set CONVEYOR_GRPC_TOKEN, or give --token, to one of the service's tokens)"
    return text


def broker_reachable(settings: Settings) -> bool:
    """Whether RabbitMQ accepts a connection with the configured credentials."""
    try:
        params = connection_parameters(settings, "cli", timeout_s=BROKER_CHECK_TIMEOUT_S)
        pika.BlockingConnection(params).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means unreachable here
        return False


def redis_reachable(settings: Settings) -> bool:
    """Whether Redis answers PING."""
    try:
        return bool(redis.Redis.from_url(settings.redis_url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def queue_table(bus: RabbitMQBus) -> str:
    """Queue depths per service, one line each, in columns as wide as the longest name."""
    names = service_names()
    width = max(len("service"), *map(len, names))
    lines = [f"{'service':<{width}} {'ready':>7} {'retrying':>9} {'dead':>6}"]
    for name in names:
        depths = bus.queue_depths(name)
        if depths["ready"] < 0:
            lines.append(f"{name:<{width}}  (queue not declared yet)")
            continue
        retrying = sum(v for k, v in depths.items() if k.startswith("retry") and v > 0)
        lines.append(f"{name:<{width}} {depths['ready']:>7} {retrying:>9} {depths['dead']:>6}")
    return "\n".join(lines)


def model_table(live: dict[str, dict[str, Any]]) -> str:
    """Per model version, as monitoring sees it: served, latency, fallbacks, quality, drift."""
    if not live:
        return "models: nothing served yet (or the monitoring service is not running)"
    header = (f"{'model':<8} {'served':>9} {'p50/p95/p99 ms':>18} {'fallback':>9} "
              f"{'accuracy (eval)':>16} {'outcomes':>9}  drift")
    return "\n".join([header, *(_model_line(v, view) for v, view in live.items())])


def _model_line(version: str, view: dict[str, Any]) -> str:
    percentiles = (view.get(f"latency_{p}_ms") for p in ("p50", "p95", "p99"))
    latency = "/".join(_figure(value, ".1f") for value in percentiles)
    live = _figure((view.get("quality") or {}).get("accuracy"), ".3f")
    expected = _figure((view.get("quality_expected") or {}).get("accuracy"), ".3f")
    drift = str(view.get("drift_level", "-"))
    if view.get("degraded"):
        drift += f", degraded: {view['degraded']}"
    return (f"{version:<8} {view.get('served', 0):>9} {latency:>18} "
            f"{_figure(view.get('fallback_share'), '.1%'):>9} {f'{live} ({expected})':>16} "
            f"{view.get('outcomes', 0):>9}  {drift}")


def _figure(value: Any, spec: str) -> str:
    """A number formatted, or "-" when there is none."""
    if not isinstance(value, int | float) or math.isnan(value):
        return "-"
    return format(value, spec)
