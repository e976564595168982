"""An alert webhook receiver in a lab namespace: records each JSON POST it gets.

``WebhookReceiver(host, port)`` binds inside ``host``'s namespace (the socket is made
there; the accept loop is a thread of this process, bounded by ``max_seconds``). The first
``fail_first`` requests get HTTP 500, so the sender's retries show; ``hang`` makes it
accept and never answer (a webhook that blackholes).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
import time
from typing import Any

from lab.netns import Host


class WebhookReceiver:
    def __init__(self, host: Host, port: int = 8099, max_seconds: float = 300.0) -> None:
        self.host = host
        self.port = port
        # The path stands for the token a real webhook URL carries: it must never be logged.
        self.path = "/hook/" + secrets.token_hex(12)
        self.posts: list[dict[str, Any]] = []
        """Requests answered 2xx, in order."""
        self.attempts: list[dict[str, Any]] = []
        """Every request read, answered 500 or not."""
        self.requests = 0
        self.fail_first = 0
        self.hang = False
        self._lock = threading.Lock()
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self.sock: socket.socket = host.call(self._listen, port)
        self._thread = threading.Thread(target=self._serve, name=f"webhook-{host.name}")
        self._thread.daemon = True
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host.public_ip}:{self.port}{self.path}"

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(16)
        sock.settimeout(0.1)
        return sock

    def kinds(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(p["body"].get("kind", ""), p["body"].get("host", "")) for p in self.posts]

    def _serve(self) -> None:
        held = self._held
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.requests += 1
                fail = self.requests <= self.fail_first
            if self.hang:
                with self._lock:
                    held.append(conn)  # never answered; see release()
                continue
            with conn, contextlib.suppress(OSError, ValueError):
                conn.settimeout(2.0)
                self._answer(conn, fail)
        self.release()

    def release(self) -> None:
        """Stop hanging: close the connections held so far (their senders see an error)."""
        self.hang = False
        with self._lock:
            held, self._held[:] = list(self._held), []
        for conn in held:
            conn.close()

    def _answer(self, conn: socket.socket, fail: bool) -> None:
        data = b""
        for _ in range(100):
            chunk = conn.recv(65536)
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                if len(body) >= length:
                    break
            if not chunk:
                break
        request_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        status = b"500 Internal Server Error" if fail else b"204 No Content"
        post = {"request": request_line, "body": json.loads(body or b"{}"), "ts": time.time()}
        with self._lock:
            self.attempts.append(post)
            if not fail:
                self.posts.append(post)
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()
