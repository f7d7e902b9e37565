"""An HTTP server on 127.0.0.1 that misbehaves on request, for download tests.

Each path is given a list of replies: the first request gets the first reply, the
second the second, and every later request the last one. The server counts requests
and records their times per path, so tests can check retries and resumes.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Seconds to wait before sending the status line.
    delay: float = 0.0
    # Content-Length to announce; larger than the body makes a truncated response.
    declared_length: int | None = None


class _Handler(BaseHTTPRequestHandler):
    server: FaultyServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        reply = self.server.next_reply(self.path)
        delay = reply.delay + self.server.delay
        if delay:
            time.sleep(delay)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        length = reply.declared_length if reply.declared_length is not None else len(reply.body)
        self.send_header("Content-Length", str(length))
        if length != len(reply.body):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(reply.body)
        self.wfile.flush()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature fixed
        pass


class FaultyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default listen backlog of 5 drops connections when a test opens
    # more at once, and the client's connect then times out.
    request_queue_size = 128

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, list[Reply]] = {}
        self.requests: defaultdict[str, int] = defaultdict(int)
        self.request_times: defaultdict[str, list[float]] = defaultdict(list)
        # Extra seconds added before every reply, to make a slow server.
        self.delay = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def route(self, path: str, *replies: Reply) -> str:
        """Serve `replies` at `path` and return the full URL."""
        self.routes[path] = list(replies)
        return self.base_url + path

    def next_reply(self, path: str) -> Reply:
        with self._lock:
            count = self.requests[path]
            self.requests[path] += 1
            self.request_times[path].append(time.monotonic())
        replies = self.routes.get(path)
        if not replies:
            return Reply(404, b"no such route\n")
        return replies[min(count, len(replies) - 1)]

    def start(self) -> FaultyServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()
