"""A stand-in for the load balancer in front of a cluster: one public loopback address whose
requests go to whichever instance ``route(path)`` names.

One request per connection (the answer closes it), so a browser's next request is routed
afresh even where it would reuse a connection. Hop-by-hop headers are dropped; everything else
(cookies, redirects, the Host the browser used) passes through unchanged, as through a proxy
that preserves Host.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade"}
)
TIMEOUT_SECONDS = 30.0


class Balancer:
    """``with Balancer(route) as lb:`` browse ``lb.url``; ``lb.served`` counts by backend."""

    def __init__(self, route: Callable[[str], int]) -> None:
        self.route = route
        self.served: Counter[int] = Counter()
        self.paths: list[tuple[int, str]] = []
        balancer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection

            def _forward(self) -> None:
                port = balancer.route(self.path)
                balancer.served[port] += 1
                balancer.paths.append((port, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_SECONDS)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                    self.send_response_only(answer.status, answer.reason)
                    for name, value in answer.getheaders():
                        if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                finally:
                    upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Balancer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
