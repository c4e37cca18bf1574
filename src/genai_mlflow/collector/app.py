"""The collector's HTTP server (standard library ``ThreadingHTTPServer``, HTTP/1.1 keep-alive).

Routes: ``POST /v1/traces`` (OTLP/HTTP, protobuf or JSON), ``GET /healthz``, ``GET /readyz`` and
``GET /metrics``. Everything but reading and writing HTTP is in ``service.py``.

``run_collector`` serves until SIGTERM or SIGINT, then stops accepting connections, lets the
requests in flight finish, and flushes the spool to MLflow within the grace period.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from genai_mlflow.config import Settings

from . import otlp
from .config import CollectorConfig
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .service import CollectorService, Reply

logger = logging.getLogger("genai_mlflow.collector")

TRACES_PATH = "/v1/traces"
DRAIN_MAX_BYTES = 8 << 20  # an unread body up to this size is read and discarded before answering
_CHUNK = 64 * 1024


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them; past that a connection
    gets a 503 and is closed at once."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: CollectorService) -> None:
        self.service = service
        self._connections = 0
        self._count_lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"timeout": service.config.read_timeout_s})
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._count_lock:
            full = self._connections >= self.service.config.max_connections
            if not full:
                self._connections += 1
        if full:
            self.service.metrics.shed.inc(1.0, "connections")
            _refuse(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (reset, timeout) is routine: logged at debug, not printed."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            logger.debug("genai-mlflow collector: connection from %s ended: %s", client_address, error)
        else:
            logger.exception("genai-mlflow collector: error on a connection from %s", client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            with self._count_lock:
                self._connections -= 1


def _refuse(sock: socket.socket) -> None:
    body = b"too many connections\n"
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    try:
        sock.settimeout(1.0)
        sock.sendall(head.encode() + body)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "genai-mlflow-collector"
    sys_version = ""
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    # --- routes ----------------------------------------------------------------------------------

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != TRACES_PATH:
            self._discard_body()
            self._send_text(404, f"not found: POST {path}; OTLP traces go to {TRACES_PATH}\n")
            return
        self._body_read = False
        try:
            headers = {name.lower(): value for name, value in self.headers.items()}
            reply = self.server.service.export(headers, self._read_body)
        except Exception:
            logger.exception("genai-mlflow collector failed on a request")
            reply = Reply(500, "text/plain; charset=utf-8", b"internal error\n", close=True)
        if not self._body_read:
            self._discard_body()
        self._send(reply)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        service = self.server.service
        if path == "/healthz":
            self._send_text(200, "ok\n")
        elif path == "/readyz":
            ready, checks = service.ready()
            body = json.dumps({"ready": ready, **checks}).encode()
            self._send(Reply(200 if ready else 503, "application/json", body))
        elif path == "/metrics":
            self._send(Reply(200, METRICS_CONTENT_TYPE, service.metrics_text().encode()))
        elif path == TRACES_PATH:
            self._send(Reply(405, "text/plain; charset=utf-8", b"use POST\n", {"Allow": "POST"}))
        else:
            self._send_text(404, f"not found: {path}\n")

    def do_PUT(self) -> None:
        self._method_not_allowed()

    def do_DELETE(self) -> None:
        self._method_not_allowed()

    def do_PATCH(self) -> None:
        self._method_not_allowed()

    def _method_not_allowed(self) -> None:
        self._discard_body()
        self._send(Reply(405, "text/plain; charset=utf-8", b"method not allowed\n", {"Allow": "GET, POST"}))

    # --- bodies ----------------------------------------------------------------------------------

    def _read_body(self, limit: int) -> bytes:
        """The request body (Content-Length or chunked), at most ``limit`` bytes."""
        self._body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length = self._content_length()
        if length > limit:
            self._body_read = False  # drained, if small enough, before answering
            raise otlp.RequestError(413, f"body of {length} bytes is over the limit of {limit}")
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise otlp.RequestError(400, f"body ended after {len(data)} of {length} bytes")
        return data

    def _content_length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise otlp.RequestError(400, f"invalid Content-Length {raw!r}")
        return length

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                chunk = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise otlp.RequestError(400, "malformed chunked body") from None
            if chunk == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            size += chunk
            if size > limit:
                self.close_connection = True
                raise otlp.RequestError(413, f"body is over the limit of {limit} bytes")
            parts.append(self.rfile.read(chunk))
            self.rfile.readline(1024)  # the CRLF after the chunk

    def _discard_body(self) -> None:
        """Read and drop a body not read, so the client sees the answer; close if it is large."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > DRAIN_MAX_BYTES:
            self.close_connection = True
            return
        while length > 0:
            data = self.rfile.read(min(_CHUNK, length))
            if not data:
                self.close_connection = True
                return
            length -= len(data)

    # --- answers ---------------------------------------------------------------------------------

    def _send_text(self, status: int, text: str) -> None:
        self._send(Reply(status, "text/plain; charset=utf-8", text.encode()))

    def _send(self, reply: Reply) -> None:
        if reply.close or self.server.service.stopping:
            self.close_connection = True
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True  # the client went away


class CollectorServer:
    """The HTTP server and the service behind it; ``start``, then ``stop``."""

    def __init__(self, settings: Settings, config: CollectorConfig) -> None:
        self.service = CollectorService(settings, config)
        self._server = _Server((config.host, config.port), self.service)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"

    def start(self) -> None:
        self.service.start()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="genai-mlflow-collector-http",
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self, grace_s: float | None = None) -> bool:
        """Stop accepting, finish the requests in flight, flush within the grace period."""
        grace = self.service.config.grace_s if grace_s is None else grace_s
        self.service.stopping = True
        self._server.shutdown()  # no more accepts
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
        return self.service.shutdown(grace)


def run_collector(settings: Settings, config: CollectorConfig) -> int:
    """Serve until SIGTERM or SIGINT; then shut down gracefully. The exit status is 0."""
    server = CollectorServer(settings, config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(
            f"genai-mlflow collector listening on {server.url} (POST {TRACES_PATH}); writing to "
            f"{settings.tracking_uri} through the spool {server.service.pipeline.spool.directory}",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print(
            "genai-mlflow collector: stopping (no new requests), flushing to MLflow",
            file=sys.stderr,
            flush=True,
        )
        flushed = server.stop()
        print(
            "genai-mlflow collector: stopped; "
            + ("everything landed" if flushed else "the rest stays in the spool for the next start"),
            file=sys.stderr,
            flush=True,
        )
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
