"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the local S3 server (moto).

Point boto3 / pyarrow at ``proxy.endpoint_url`` instead of the server's: each request is forwarded
unless a fault is drawn for it:

- ``slow_down``: an S3 ``503 SlowDown`` answer, the request never reaches the server;
- ``reset``: the connection is reset (TCP RST) before the request is forwarded; ``reset_after``:
  after the server applied it (the answer is lost). The ``reset`` rate draws each half of the time;
- ``truncate``: a GET's answer is sent with its full ``Content-Length`` but only half of its body,
  then the connection is reset.

Faults come from seeded rates (``FaultRates``) or from rules for one key (``FaultRule``, used a
fixed number of times). Everything stays on loopback; ``stop()`` (or leaving the ``with`` block)
shuts the server and its threads down.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

KINDS = ("slow_down", "reset", "reset_after", "truncate")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass(frozen=True)
class FaultRates:
    slow_down: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    """Of GET requests only (the others have no body to cut)."""
    seed: int = 0


@dataclass
class FaultRule:
    """Inject ``kind`` into the next ``times`` requests whose path contains ``path_contains`` (and method)."""

    kind: str
    path_contains: str
    times: int = 1
    method: str | None = None


class FaultProxy:
    def __init__(self, upstream: str, rates: FaultRates | None = None, rules: list[FaultRule] | None = None) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rates = rates or FaultRates()
        self.rules = list(rules or [])
        self.injected: Counter = Counter()
        self.requests = 0
        self._rng = random.Random(self.rates.seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def draw(self, method: str, path: str) -> str | None:
        """The fault for one request, or None to forward it untouched."""
        with self._lock:
            self.requests += 1
            for rule in self.rules:
                if rule.times > 0 and rule.path_contains in path and rule.method in (None, method):
                    rule.times -= 1
                    self.injected[rule.kind] += 1
                    return rule.kind
            r = self._rng.random()
            for kind, rate in (("slow_down", self.rates.slow_down), ("reset", self.rates.reset),
                               ("truncate", self.rates.truncate if method == "GET" else 0.0)):
                if r < rate:
                    if kind == "reset" and self._rng.random() < 0.5:
                        kind = "reset_after"
                    self.injected[kind] += 1
                    return kind
                r -= rate
            return None

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection ends its thread after this many seconds

    def log_message(self, *args) -> None:  # quiet
        return

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _read_body(self) -> tuple[bytes, dict[str, str]]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:  # forward the chunked body as it came (aws-chunked signatures stay intact)
                size_line = self.rfile.readline()
                raw += size_line
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    return bytes(raw), headers
                raw += self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(length) if length else b""), headers

    def _reset(self) -> None:
        """Drop the connection with a TCP RST, as a failing load balancer does."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _proxy(self) -> None:
        body, headers = self._read_body()
        fault = self.owner.draw(self.command, self.path)
        if fault == "slow_down":
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOW_DOWN)
            return
        if fault == "reset":
            self._reset()
            return
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            status, reply_headers = response.status, response.getheaders()
        finally:
            upstream.close()
        if fault == "reset_after":
            self._reset()  # the request was applied; its answer is lost
            return
        self.send_response(status)
        for name, value in reply_headers:
            if name.lower() in HOP_BY_HOP or name.lower() == "transfer-encoding":
                continue
            if name.lower() == "content-length" and self.command != "HEAD":
                continue
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "truncate" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.wfile.write(data)
