"""The HTTP side of every service: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

Example::

    server = HealthServer(registry, ready=lambda: consumer_connected.is_set(), port=9100)
    server.start()   # serves on a daemon thread; server.port is the bound port
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class HealthServer:
    """A small threaded HTTP server for probes and scraping."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        host: str = "0.0.0.0",
        port: int = 9100,
    ) -> None:
        self.registry, self.ready = registry, ready
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True

    @property
    def port(self) -> int:
        """The port actually bound (useful when asked for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Serve on a daemon thread."""
        threading.Thread(target=self._server.serve_forever, name="http", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()

    def _routes(self) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
        return {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(self.registry)),
            "/healthz": lambda: (200, "text/plain", b"ok\n"),
            "/readyz": lambda: (200, "text/plain", b"ready\n")
            if self.ready()
            else (503, "text/plain", b"not ready\n"),
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        routes = self._routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                route = routes().get(self.path.split("?")[0])
                status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # probes are not worth a log line
                pass

        return Handler
