"""An HTTP proxy that fails chosen requests before forwarding the rest: transient faults in front of a real server."""

from __future__ import annotations

import http.client
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

# (method, path) -> status to answer instead of forwarding, or None to forward.
FaultPolicy = Callable[[str, str], int | None]

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # a client that gave up on a faulted call is expected


class FaultyProxy:
    def __init__(self, upstream: str, policy: FaultPolicy):
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port
        self.policy = policy
        self.log: list[tuple[str, str, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy.policy(self.command, self.path)
                if fault is not None:
                    payload = b'{"error": {"code": %d, "message": "injected fault"}}' % fault
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    proxy.log.append((self.command, self.path, fault))
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()
                proxy.log.append((self.command, self.path, resp.status))

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def fail_first(n: int, status: int, matches: Callable[[str, str], bool] = lambda m, p: True) -> FaultPolicy:
    """Fail the first n matching requests with `status`, then forward everything."""
    lock, left = threading.Lock(), [n]

    def policy(method: str, path: str) -> int | None:
        if not matches(method, path):
            return None
        with lock:
            if left[0] > 0:
                left[0] -= 1
                return status
        return None

    return policy


def request_kind(method: str, path: str) -> str:
    """Which GCS JSON API call a request is: upload, list, download, metadata (exists), delete, bucket or other."""
    route = path.split("?", 1)[0]
    if method == "POST" and route.startswith("/upload/"):
        return "upload"
    if method == "DELETE":
        return "delete"
    if method == "GET" and (route.startswith("/download/") or "alt=media" in path):
        return "download"
    if method == "GET" and re.fullmatch(r"/storage/v1/b/[^/]+/o/?", route):
        return "list"
    if method == "GET" and "/o/" in route:
        return "metadata"
    if method == "GET" and re.fullmatch(r"/storage/v1/b/[^/]+", route):
        return "bucket"
    return "other"


class FailEachKind:
    """A policy that fails the first ``n`` requests of every kind (``request_kind``) with ``status``.

    ``injected`` counts the faults per kind, so a test can check that every kind of call
    really met a transient error, not just the first request of the run.
    """

    def __init__(self, n: int, status: int, kind_of: Callable[[str, str], str] = request_kind):
        self.n, self.status, self.kind_of = n, status, kind_of
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str) -> int | None:
        kind = self.kind_of(method, path)
        with self._lock:
            if self.injected[kind] < self.n:
                self.injected[kind] += 1
                return self.status
        return None
