"""A small real reverse proxy for tests: a threaded HTTP(S) server on 127.0.0.1 in front of an MLflow
server, optionally demanding a bearer token, optionally serving TLS with a self-signed certificate.

It forwards every request as is (REST calls, OTLP ``/v1/traces`` protobuf bodies, artifact uploads and
downloads) over real sockets, and records what it saw, so a test can tell that a request really went
through it, and what it answered.

MLflow's own ``basic-auth`` app reads only ``Authorization: Basic``: a bearer token, which MLflow
clients send for ``MLFLOW_TRACKING_TOKEN``, is what a gateway in front of MLflow checks, as here.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socket import socket
from typing import Any

_HOST = "127.0.0.1"
# Never forwarded: they describe one hop, not the request (RFC 9110, 7.6.1).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)
_UPSTREAM_TIMEOUT_S = 120.0
_HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    """PEM certificate; also what a client trusts (MLFLOW_TRACKING_SERVER_CERT_PATH)."""
    key: Path


def self_signed_cert(directory: Path, host: str = _HOST) -> TlsFiles:
    """A fresh key and a self-signed certificate for ``host`` (an IP address) and ``localhost``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "genai-mlflow test proxy")])
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        # Its own trust anchor: OpenSSL accepts a self-signed leaf in the trust store only as a CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(cert=directory / "proxy-cert.pem", key=directory / "proxy-key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    return files


@dataclass(frozen=True)
class Seen:
    """One request the proxy answered."""

    method: str
    path: str
    content_type: str
    body_bytes: int
    status: int
    authorization: str
    """The Authorization scheme the client sent (``Bearer``, ``Basic``), or ``""``."""
    forwarded: bool
    """False when the proxy answered itself (a missing or wrong token)."""


class ReverseProxy:
    """Forwards to ``upstream`` (``http://host:port``). Use as a context manager.

    ``token``: requests without ``Authorization: Bearer <token>`` get 401 and are not forwarded;
    the header is not passed on. ``tls``: serve HTTPS with these files.
    """

    def __init__(self, upstream: str, *, token: str | None = None, tls: TlsFiles | None = None) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream_host: str = parts.hostname
        self.upstream_port: int = parts.port
        self.token = token
        self.tls = tls
        self.seen: list[Seen] = []
        self.handshake_errors: list[str] = []
        self._lock = threading.Lock()
        self._httpd: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the proxy is not running")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{_HOST}:{self._httpd.server_address[1]}"

    def start(self) -> None:
        context: ssl.SSLContext | None = None
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert, self.tls.key)
        self._httpd = _ProxyServer(self, context)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-reverse-proxy",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> ReverseProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def record_handshake_error(self, error: BaseException) -> None:
        with self._lock:
            self.handshake_errors.append(f"{type(error).__name__}: {error}")

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def forwarded(self) -> list[Seen]:
        """The requests that reached MLflow (not answered by the proxy itself)."""
        return [s for s in self.requests() if s.forwarded]


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, proxy: ReverseProxy, context: ssl.SSLContext | None) -> None:
        self.proxy = proxy
        self.context = context
        super().__init__((_HOST, 0), _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.context is not None:
            # The handshake runs in the request's thread (_Handler.setup): a client that hangs or
            # rejects the certificate never blocks the accept loop.
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-request; the tests check what was seen


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as MLflow's requests session expects
    server: _ProxyServer
    connection: socket

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(_HANDSHAKE_TIMEOUT_S)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                self.server.proxy.record_handshake_error(exc)
                raise
            self.request.settimeout(None)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()  # read even when refusing, so the connection stays usable
        authorization = self.headers.get("Authorization", "")
        seen = {
            "method": self.command,
            "path": self.path,
            "content_type": self.headers.get("Content-Type", ""),
            "body_bytes": len(body),
            "authorization": authorization.split(" ", 1)[0],
        }
        if proxy.token is not None and authorization != f"Bearer {proxy.token}":
            refusal = b'{"error_code": "UNAUTHENTICATED", "message": "a valid bearer token is required"}'
            self._reply(
                401,
                [("WWW-Authenticate", 'Bearer realm="mlflow"'), ("Content-Type", "application/json")],
                refusal,
            )
            proxy.record(Seen(status=401, forwarded=False, **seen))
            return
        headers = {
            name: value
            for name, value in self.headers.items()
            if name.lower() not in _HOP_BY_HOP and not (proxy.token and name.lower() == "authorization")
        }
        headers["X-Forwarded-Proto"] = "https" if proxy.tls else "http"
        upstream = http.client.HTTPConnection(
            proxy.upstream_host, proxy.upstream_port, timeout=_UPSTREAM_TIMEOUT_S
        )
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            reply_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            status = response.status
        except OSError as exc:
            status, data = 502, f"upstream error: {exc}".encode()
            reply_headers = [("Content-Type", "text/plain")]
        finally:
            upstream.close()
        self._reply(status, reply_headers, data)
        proxy.record(Seen(status=status, forwarded=True, **seen))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward
